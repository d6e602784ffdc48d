"""Wheels the GPU benchmark needs on the lent GPU machine, which has no network.

That machine (see bench/RESULTS.md, "GPU") runs Python 3.12 with torch, transformers,
tokenizers, safetensors, accelerate, peft, huggingface_hub and numpy already installed,
but not the web stack of our server. The device tool copies the working tree plus up to
8 ignored paths, 64 MiB in all, so this module fetches the missing wheels *here* into
the git-ignored ``bench/wheels-py312/`` and ``bench/gpu_h100.sh`` installs them *there*:

    python -m bench.gpu_wheels               # download (needs PyPI), then check the size
    python -m bench.gpu_wheels --list        # what would be downloaded; no network
    python -m bench.gpu_wheels check         # size and freshness of the folder; no network
    python -m bench.gpu_wheels install --target /tmp/gpu-site   # on the GPU machine
    python -m bench.gpu_wheels verify        # import every runtime package, print versions

The folder holds the resolved closure of the server's runtime packages (see RUNTIME for
why each is needed) for CPython 3.12 on manylinux x86-64, pinned as requirements.txt and
requirements-dev.txt pin them, and never torch or the Hugging Face stack (MACHINE): those
come from the GPU machine, whose versions were checked to work (transformers 5.17.0,
huggingface_hub 1.33.0, tokenizers 0.23.2 ran the server here). The UI is off in the
benchmark (``THAI_ENABLE_UI=false``), so Gradio is not needed; nor are the document and
Thai-text packages, which api/ imports only inside the routes that use them.

``install`` runs on the GPU machine's own python and needs nothing but the standard
library and ``packaging`` (or pip's copy of it). It installs a wheel only where the
machine lacks that distribution or has a version our packages' requirements reject
(e.g. its ``prometheus-client`` and ``httpx`` are kept, ``fastapi`` and ``pydantic`` are
added), into a ``--target`` folder that goes first on ``PYTHONPATH``, so nothing of the
machine's own environment is changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "wheels-py312"
MANIFEST = "MANIFEST.json"
LIMIT_MIB = 60          # the device call carries 64 MiB with the working tree: keep margin
CARRY_LIMIT_MIB = 64
PYTHON = "3.12"
ABI = "cp312"
# pip matches --platform exactly, so every manylinux level the machine's glibc accepts is
# named (KINDS.md: Python 3.12.3, i.e. a glibc well past 2.31).
PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 24, 26, 27, 28, 31, 34, 35, 39)))

# distribution -> (import name, why the server or the benchmark needs it at run time)
RUNTIME: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "the app itself (api/server.py, api/routes)"),
    "uvicorn": ("uvicorn", "the HTTP server app.py runs"),
    "httptools": ("httptools", "api/http_protocol.py extends uvicorn's httptools protocol "
                               "(uvicorn[standard]'s parser)"),
    "pydantic": ("pydantic", "request and response models (api/protocol.py)"),
    "pydantic-settings": ("pydantic_settings", "every THAI_* setting (api/settings.py)"),
    "python-multipart": ("python_multipart", "/v1/summarize/document's form (Starlette "
                                             "parses forms with it)"),
    "prometheus-client": ("prometheus_client", "/metrics and the engine's metrics"),
    "prometheus-fastapi-instrumentator": ("prometheus_fastapi_instrumentator",
                                          "the HTTP metrics (api/server.py)"),
    "httpx": ("httpx", "the load generator (bench/loadgen.py), the readiness polls "
                       "(bench/servers.py) and api/engine/upstream_engine.py"),
    "psutil": ("psutil", "/health's memory figure"),
}
# Shipped when requirements.txt names it or api/ imports it: imported on the first
# structured-output request only (api/engine/grammar.py), so the benchmark runs without
# it, but the server on the GPU machine is then whole.
OPTIONAL = {"llguidance": ("llguidance", "structured output (api/engine/grammar.py), "
                                         "imported on the first constrained request")}
# Taken from the GPU machine, never shipped: distribution -> (import name, minimum that
# works or None). The minimum is the version seen there and checked here.
MACHINE: dict[str, tuple[str, str | None]] = {
    "torch": ("torch", None),
    "transformers": ("transformers", "5.17"),
    "tokenizers": ("tokenizers", None),
    "safetensors": ("safetensors", None),
    "accelerate": ("accelerate", None),
    "huggingface-hub": ("huggingface_hub", None),
    "numpy": ("numpy", None),
    "jinja2": ("jinja2", None),   # chat templates
}
# Not shipped on purpose, and why (printed by --list; the report points here).
LEFT_OUT = {
    "gradio": "the UI is off in the benchmark (THAI_ENABLE_UI=false: api/server.py imports "
              "thai_ui only when it is on)",
    "pythainlp, grapheme, python-crfsuite": "Thai splitting of long texts, imported inside "
                                            "api/documents/chunking.py on /v1/summarize only",
    "pypdf, python-docx, lxml": "document extraction, imported inside api/documents/extract.py",
    "openpyxl": "api.batch's .xlsx files",
    "peft": "LoRA adapters only; the benchmark serves merged weights (the machine has it anyway)",
    "uvloop": "on the machine already; uvicorn uses it when present",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """``packaging``'s Requirement, SpecifierSet and Version (pip's vendored copy if need be:
    the GPU machine has both, and this must run before anything is installed)."""
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # pragma: no cover - depends on the machine
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version
    return Requirement, SpecifierSet, Version


# ---------------------------------------------------------------------- pins and specs
def read_pins(*files: Path) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` (extras dropped) in the files."""
    pins: dict[str, str] = {}
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
            if m:
                pins[canonical(m.group(1))] = m.group(3)
    return pins


def requirement_specs(repo: Path = REPO) -> list[str]:
    """What to download: RUNTIME (and OPTIONAL named in requirements.txt), pinned where
    requirements.txt or requirements-dev.txt pin them."""
    pins = read_pins(repo / "requirements.txt", repo / "requirements-dev.txt")
    named = _names(repo / "requirements.txt")
    names = list(RUNTIME) + [n for n, (module, _) in OPTIONAL.items()
                             if n in named or _imported_by_api(repo, module)]
    return [f"{n}=={pins[n]}" if n in pins else n for n in names]


def _imported_by_api(repo: Path, module: str) -> bool:
    pattern = re.compile(rf"^\s*(import|from)\s+{re.escape(module)}\b", re.M)
    return any(pattern.search(p.read_text(errors="replace")) for p in (repo / "api").rglob("*.py"))


def _names(path: Path) -> set[str]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if m:
            out.add(canonical(m.group(1)))
    return out


# ---------------------------------------------------------------------- the folder
def wheel_meta(path: Path) -> dict:
    """Name, version and base requirements (``Requires-Dist`` lines) of one wheel."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = zf.read(meta_name).decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    fields: dict[str, list[str]] = {}
    for line in head.splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), []).append(value.strip())
    return {"name": canonical(fields["Name"][0]), "version": fields["Version"][0],
            "requires": fields.get("Requires-Dist", [])}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tree_bytes(repo: Path = REPO) -> int | None:
    """What the device call carries besides the wheels: tracked and untracked-not-ignored
    files (None when git is not there)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in out.decode(errors="replace").split("\0"):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


class SizeError(RuntimeError):
    pass


def check_size(folder: Path, limit_mib: float = LIMIT_MIB) -> int:
    """Raise SizeError when the folder is over ``limit_mib``; return its size in bytes."""
    size = folder_bytes(folder)
    if size > limit_mib * 2**20:
        biggest = sorted(((p.stat().st_size, p.name) for p in folder.glob("*.whl")), reverse=True)[:5]
        raise SizeError(
            f"{folder} holds {size / 2**20:.1f} MiB of wheels, over the {limit_mib:g} MiB limit "
            f"(the device call carries at most {CARRY_LIMIT_MIB} MiB with the working tree); "
            "largest: " + ", ".join(f"{n} {s / 2**20:.1f} MiB" for s, n in biggest))
    return size


def stale(folder: Path, repo: Path = REPO) -> list[str]:
    """Pins in requirements*.txt that the folder's manifest does not match."""
    path = folder / MANIFEST
    if not path.exists():
        return [f"{path} is missing: run python -m bench.gpu_wheels"]
    manifest = json.loads(path.read_text())
    have = {w["name"]: w["version"] for w in manifest.get("wheels", [])}
    problems = []
    for spec in requirement_specs(repo):
        name, _, version = spec.partition("==")
        if name not in have:
            problems.append(f"{name} is not in {folder.name}")
        elif version and have[name] != version:
            problems.append(f"{name} {have[name]} in {folder.name}, {version} pinned")
    return problems


def download(folder: Path = WHEELS, repo: Path = REPO, limit_mib: float = LIMIT_MIB) -> dict:
    """Resolve and download the closure for CPython 3.12 into a fresh folder, then swap it
    in, so an old version never lingers beside a new one (two versions of a wheel stop
    the install)."""
    specs = requirement_specs(repo)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=folder.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
               "--python-version", PYTHON, "--implementation", "cp", "--abi", ABI,
               *(a for p in PLATFORMS for a in ("--platform", p)), "--dest", str(tmp), *specs]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        wheels = []
        for path in sorted(tmp.glob("*.whl")):
            meta = wheel_meta(path)
            wheels.append({"file": path.name, "name": meta["name"], "version": meta["version"],
                           "bytes": path.stat().st_size,
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        shipped = {w["name"] for w in wheels}
        leaked = shipped & set(MACHINE)
        if leaked:
            raise RuntimeError(f"the closure pulled in {sorted(leaked)}, which the GPU machine "
                               "provides: a runtime package must have gained a dependency")
        manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "python": PYTHON, "abi": ABI, "platforms": list(PLATFORMS),
                    "specs": specs, "top_level": [s.partition("==")[0] for s in specs],
                    "wheels": wheels, "total_bytes": sum(w["bytes"] for w in wheels)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check_size(tmp, limit_mib)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------- on the device
def installed_versions() -> dict[str, str]:
    """Distributions this interpreter sees (first on sys.path wins, as imports do)."""
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        if name and canonical(name) not in out:
            out[canonical(name)] = dist.version
    return out


def plan(folder: Path, installed: dict[str, str], top_level: list[str] | None = None) -> dict:
    """Which wheels to install so every runtime requirement holds, reusing the machine's
    distributions wherever they satisfy every requirement on them.

    ``top_level``: requirement strings (default: the manifest's specs); a pin ``==v`` counts
    as ``>=v`` here, so the machine's own copy is kept when it is at least what
    requirements.txt pins (a newer httpx or prometheus-client is fine; an older one is
    shadowed by ours). Then the requirements of each wheel chosen are added, and this
    repeats until nothing changes: a machine distribution that a newly chosen wheel
    rejects is replaced by the folder's.
    Returns ``{"install": [files], "reuse": {name: version}, "problems": [...]}``.
    """
    Requirement, SpecifierSet, Version = _packaging()
    wheels: dict[str, tuple[Path, dict]] = {}
    for path in sorted(folder.glob("*.whl")):
        meta = wheel_meta(path)
        if meta["name"] in wheels:
            raise RuntimeError(f"two wheels of {meta['name']} in {folder}: "
                               f"{wheels[meta['name']][0].name} and {path.name}")
        wheels[meta["name"]] = (path, meta)
    if top_level is None:
        manifest = folder / MANIFEST
        top_level = (json.loads(manifest.read_text())["specs"] if manifest.exists()
                     else list(RUNTIME))
    wanted: dict[str, list[tuple[object, str]]] = {}
    for spec in top_level:
        req = Requirement(spec.replace("==", ">="))
        wanted.setdefault(canonical(req.name), []).append((req.specifier, "requirements.txt"))
    for name, (_, minimum) in MACHINE.items():
        wanted.setdefault(name, []).append(
            (SpecifierSet(f">={minimum}" if minimum else ""), "checked to work"))
    chosen: dict[str, str] = {}   # name -> "machine" | "wheel"
    problems: list[str] = []

    def fits(version: str, specs) -> bool:
        try:
            v = Version(version)
        except Exception:
            return False
        return all(s.contains(v, prereleases=True) for s, _ in specs)

    changed = True
    while changed:
        changed = False
        for name in list(wanted):
            if chosen.get(name) == "wheel":
                continue
            specs = wanted[name]
            if name in installed and fits(installed[name], specs):
                chosen[name] = "machine"
                continue
            if name in MACHINE:
                why = (f"has {installed[name]}" if name in installed else "lacks it")
                need = ",".join(str(s) for s, _ in specs if str(s)) or "any version"
                msg = f"{name}: the GPU machine {why}; the benchmark needs {need}"
                if msg not in problems:
                    problems.append(msg)
                chosen[name] = "machine"
                continue
            if name not in wheels:
                need = "; ".join(f"{s or 'any'} ({src})" for s, src in specs)
                msg = f"{name}: needed ({need}) but neither the machine nor {folder.name} has it"
                if msg not in problems:
                    problems.append(msg)
                continue
            path, meta = wheels[name]
            if not fits(meta["version"], specs):
                problems.append(f"{name}: {path.name} does not satisfy "
                                + "; ".join(f"{s} ({src})" for s, src in specs))
                chosen[name] = "wheel"
                continue
            chosen[name] = "wheel"
            changed = True
            for line in meta["requires"]:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                dep = canonical(req.name)
                wanted.setdefault(dep, []).append((req.specifier, f"{name} {meta['version']}"))
                if chosen.get(dep) == "machine" and not fits(installed.get(dep, ""), wanted[dep]):
                    del chosen[dep]  # the machine's no longer fits: decide again
    install = sorted(wheels[n][0].name for n, how in chosen.items() if how == "wheel")
    reuse = {n: installed[n] for n, how in sorted(chosen.items())
             if how == "machine" and n in installed}
    return {"install": install, "reuse": reuse, "problems": problems}


def shadow_warnings(installing: dict[str, str]) -> list[str]:
    """The machine's own packages whose requirements a wheel we put first on the path
    breaks (informational: the benchmark only imports a few of them)."""
    Requirement, _, Version = _packaging()
    notes = []
    for dist in md.distributions():
        name = canonical(dist.metadata.get("Name") or "")
        for line in dist.requires or ():
            try:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:
                continue
            dep = canonical(req.name)
            if dep in installing and not req.specifier.contains(Version(installing[dep]),
                                                                prereleases=True):
                notes.append(f"{name} wants {dep}{req.specifier}, gets {installing[dep]}")
    return sorted(set(notes))


def unpack_wheel(path: Path, target: Path) -> None:
    """What pip does for ``--target`` when pip itself is missing: a wheel is a zip of the
    files to put on the path, except ``NAME.data/`` (its ``purelib``/``platlib`` go to the
    root as well; scripts and headers are not needed to import it)."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib") or not parts[-1]:
                    continue
                parts = parts[2:]
            dest = target.joinpath(*parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(info))


def install(folder: Path, target: Path, *, dry_run: bool = False) -> dict:
    """Install what ``plan`` chose into ``target`` (no network, no dependency resolution:
    the plan already did that), with pip, or by unpacking the wheels when pip is missing."""
    if not folder.is_dir():
        raise SystemExit(f"no wheel folder {folder}: run `python -m bench.gpu_wheels` on the "
                         "development machine and carry it (run(..., carry=['bench/wheels-py312']))")
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != PYTHON:
        raise SystemExit(f"the wheels in {folder} are for CPython {PYTHON}; this is {want} "
                         f"({sys.executable})")
    result = plan(folder, installed_versions())
    metas = {f: wheel_meta(folder / f) for f in result["install"]}
    result["shadowed"] = shadow_warnings({m["name"]: m["version"] for m in metas.values()})
    result["target"] = str(target)
    print(f"wheels to install into {target}: " + (", ".join(result["install"]) or "none"))
    print("reused from this machine: " + ", ".join(f"{k} {v}" for k, v in result["reuse"].items()))
    for note in result["shadowed"]:
        print(f"note: {note}")
    if result["problems"]:
        raise SystemExit("cannot run the benchmark here:\n  " + "\n  ".join(result["problems"]))
    if dry_run or not result["install"]:
        return result
    target.mkdir(parents=True, exist_ok=True)
    files = [str(folder / f) for f in result["install"]]
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target), *files]
    if importlib.util.find_spec("pip") is not None:
        subprocess.run(pip, check=True)
    else:
        for f in files:
            unpack_wheel(Path(f), target)
    (target / "GPU_WHEELS_PLAN.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def verify() -> dict[str, dict]:
    """Import every runtime and machine package; name its version and where it came from."""
    out: dict[str, dict] = {}
    failed = []
    for dist, (module, _) in {**RUNTIME, **{k: (v[0], "") for k, v in MACHINE.items()}}.items():
        try:
            mod = importlib.import_module(module)
            out[dist] = {"version": md.version(dist), "from": str(Path(mod.__file__).parent.parent)}
        except Exception as exc:  # noqa: BLE001 - reported, then fatal below
            failed.append(f"{dist} ({module}): {type(exc).__name__}: {exc}")
    for dist, (module, _) in OPTIONAL.items():  # reported, not required
        try:
            mod = importlib.import_module(module)
            out[dist] = {"version": md.version(dist), "from": str(Path(mod.__file__).parent.parent)}
        except Exception:  # noqa: BLE001
            out[dist] = {"version": "absent", "from": "(optional)"}
    for dist, info in out.items():
        print(f"  {dist:36s} {info['version']:14s} {info['from']}")
    if failed:
        raise SystemExit("missing on this python:\n  " + "\n  ".join(failed))
    return out


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="download",
                   choices=("download", "check", "install", "verify"))
    p.add_argument("--wheels", default=str(WHEELS), help="the wheel folder")
    p.add_argument("--target", default="/tmp/gpu-site", help="install: where to put them")
    p.add_argument("--dry-run", action="store_true", help="install: print the plan only")
    p.add_argument("--list", action="store_true", help="print what would be downloaded")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = p.parse_args(argv)
    folder = Path(args.wheels)
    if args.list:
        print("download (with their dependencies, CPython 3.12, manylinux x86-64):")
        for spec in requirement_specs():
            name = spec.partition("==")[0]
            print(f"  {spec:44s} {({**RUNTIME, **OPTIONAL})[name][1]}")
        print("from the GPU machine: " + ", ".join(
            f"{n}>={m}" if m else n for n, (_, m) in MACHINE.items()))
        for names, why in LEFT_OUT.items():
            print(f"not shipped: {names}: {why}")
        return 0
    if args.command == "install":
        install(folder, Path(args.target), dry_run=args.dry_run)
        return 0
    if args.command == "verify":
        verify()
        return 0
    if args.command == "download":
        manifest = download(folder, limit_mib=args.limit_mib)
        for w in manifest["wheels"]:
            print(f"  {w['file']:90s} {w['bytes'] / 2**20:6.2f} MiB")
    try:
        size = check_size(folder, args.limit_mib)
    except SizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    problems = stale(folder)
    tree = tree_bytes()
    print(f"{folder}: {size / 2**20:.2f} MiB (limit {args.limit_mib:g} MiB)"
          + (f"; with the working tree ({tree / 2**20:.2f} MiB) the device call carries "
             f"{(size + tree) / 2**20:.2f} of {CARRY_LIMIT_MIB} MiB" if tree is not None else ""))
    if tree is not None and size + tree > CARRY_LIMIT_MIB * 2**20:
        print(f"error: over the device call's {CARRY_LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    if problems:
        print("error: the folder does not match requirements*.txt:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
