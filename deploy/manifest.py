"""Write generated files without ever clobbering an operator's edits.

The output folder keeps a manifest (``.generated.json``): the SHA-256 of each
file as the generator last wrote it. On the next run a file is replaced only
when its current bytes still match that hash (nobody touched it) or when the
operator passes ``--force``. A file that differs, or one the generator never
wrote, is left alone and reported. The manifest is sorted JSON without
timestamps, so two runs with the same inputs leave identical bytes behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from deploy.render import RenderedFile

MANIFEST_NAME = ".generated.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class WriteReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed by the operator; not overwritten

    def lines(self) -> list[str]:
        out = [f"wrote      {path}" for path in self.written]
        out += [f"unchanged  {path}" for path in self.unchanged]
        out += [f"KEPT       {path}: changed since it was generated; not overwritten "
                "(compare with a fresh render, or pass --force to replace it)" for path in self.kept]
        return out


def read_manifest(out_dir: Path) -> dict[str, str]:
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files", {}) if isinstance(data, dict) else {}
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def write_files(out_dir: Path, files: list[RenderedFile], *, force: bool = False) -> WriteReport:
    """Write ``files`` under ``out_dir`` following the rules in the module docstring."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = read_manifest(out_dir)
    manifest = dict(recorded)
    report = WriteReport()
    for item in files:
        target = out_dir / item.path
        data = item.content.encode()
        new_hash = sha256(data)
        if target.is_file():
            current = sha256(target.read_bytes())
            if current == new_hash:
                _set_mode(target, item.mode)
                manifest[item.path] = new_hash
                report.unchanged.append(item.path)
                continue
            if current != recorded.get(item.path) and not force:
                report.kept.append(item.path)
                continue
        _atomic_write(target, data, item.mode)
        manifest[item.path] = new_hash
        report.written.append(item.path)
    payload = json.dumps({"generator": "deploy/setup_production.py", "files": manifest},
                         indent=2, sort_keys=True) + "\n"
    _atomic_write(out_dir / MANIFEST_NAME, payload.encode(), 0o644)
    return report


def _set_mode(path: Path, mode: int) -> None:
    if (path.stat().st_mode & 0o777) != mode:
        path.chmod(mode)


def _atomic_write(target: Path, data: bytes, mode: int) -> None:
    """Write to a sibling temporary file and rename it: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
