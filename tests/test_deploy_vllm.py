"""The generator's vLLM mode (--engine vllm), each output accepted by its real tool.

docker-compose config, systemd-analyze verify / security and kubernetes-validate
(strict, offline, against the schemas it ships) judge the generated files; the
app's env files are read by the app's own Settings. No GPU and no image is
needed: the files are checked, not run (the Compose entrypoint's key guard is
run with /bin/sh and a stand-in vllm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import generate
from tests.support import ARTIFACTS, REPO, require_tool

SETTINGS_ENV = {"THAI_PORT": "9100", "THAI_MAX_REQUEST_BYTES": "65536", "THAI_SERVED_MODEL_NAME": "thai-prod"}
TODAYS = ["thai-model-api.service", "thai-model-api.nginx", "thai-model-api.env", "docker-compose.prod.yml",
          "Dockerfile", "monitoring/prometheus.yml", "monitoring/alerts.yml", "start_api.sh"]
VLLM_FILES = ["docker-compose.vllm.yml", "vllm.env", "vllm-openai@.service", "thai-model-api.vllm.env",
              "thai-model-api.service.d/vllm.conf", "k8s/00-namespace.yaml", "k8s/10-storage.yaml",
              "k8s/20-vllm.yaml", "k8s/30-app.yaml"]
SHAPES = [(1, 1), (4, 1), (4, 2)]  # (--gpus, --tensor-parallel-size)
KEY = "k3y-0f-the-upstream-9d2c7a41e8"  # must never be written into a generated file


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A stand-in adapter folder: only its adapter_config.json (rank 8) is read."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return folder


@pytest.fixture
def env(adapter) -> dict[str, str]:
    return {**SETTINGS_ENV, "THAI_LORA_PATH": str(adapter)}


@pytest.fixture
def vllm_bin(tmp_path) -> Path:
    """A stand-in vllm executable (systemd-analyze verify checks that ExecStart= can run)."""
    path = tmp_path / "vllm-venv" / "bin" / "vllm"
    path.parent.mkdir(parents=True)
    path.write_text('#!/bin/sh\necho "vllm $*"\n')
    path.chmod(0o755)
    return path


def snapshot(out_dir) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def shape_args(gpus: int, tp: int) -> tuple[str, ...]:
    return ("--engine", "vllm", "--gpus", str(gpus), "--tensor-parallel-size", str(tp))


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def app_settings(environment: dict[str, str], tmp_path: Path) -> dict:
    """The app's own Settings read ``environment``: the values it would run with, or its error."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from api.settings import Settings; "
            "m = Settings.from_overrides({}).model; "
            "print(json.dumps({'engine': m.engine, 'urls': m.upstream_urls, 'model': m.upstream_model, "
            "'tokenizer': m.tokenizer, 'key': m.upstream_api_key}))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THAI_")}
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=tmp_path, env={**clean, **environment},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vllm_files_are_written_beside_todays_unchanged(tmp_path, env):
    out = tmp_path / "out"  # one folder for every run: the Compose files name their own Dockerfile

    generate(out, "--install-dir", str(REPO), "--engine", "local", env=env)
    today = snapshot(out)
    shutil.rmtree(out)
    generate(out, "--install-dir", str(REPO), env=env)
    assert snapshot(out) == today  # --engine local is the default
    assert sorted(p for p in today if p != ".generated.json") == sorted(TODAYS)
    shutil.rmtree(out)
    result = generate(out, "--install-dir", str(REPO), *shape_args(2, 1), env=env)
    written = snapshot(out)
    assert {path: written[path] for path in TODAYS} == {path: today[path] for path in TODAYS}  # byte for byte
    instances = ["vllm-openai/8100.env", "vllm-openai/8101.env"]
    assert sorted(p for p in written if p != ".generated.json") == sorted(TODAYS + VLLM_FILES + instances)
    manifest = json.loads(written[".generated.json"])["files"]
    assert set(manifest) == set(TODAYS + VLLM_FILES + instances)
    for secret_file in ("vllm.env", "thai-model-api.vllm.env"):
        assert os.stat(out / secret_file).st_mode & 0o777 == 0o640
    # what to run next: the three ways, with this run's names filled in
    assert "docker-compose -f docker-compose.vllm.yml up -d --build" in result.stdout
    assert "sudo systemctl enable --now vllm-openai@8100 vllm-openai@8101 thai-model-api" in result.stdout
    assert "kubectl -n thai-llm create secret generic vllm-api-key" in result.stdout
    assert "kubectl apply -f k8s/" in result.stdout
    assert "sudo nginx -t" in result.stdout
    # ./manage.sh setup-production passes the flags through
    shutil.rmtree(out)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THAI_")}
    via_manage = subprocess.run([str(REPO / "manage.sh"), "setup-production", "--out", str(out),
                                 "--install-dir", str(REPO), *shape_args(2, 1)],
                                env={**clean, **env, "PYTHON": sys.executable},
                                capture_output=True, text=True, timeout=120)
    assert via_manage.returncode == 0, via_manage.stderr
    assert snapshot(out) == written


def test_running_twice_gives_identical_bytes(tmp_path, env):
    out = tmp_path / "out"
    args = ("--install-dir", str(REPO), *shape_args(4, 2), "--replicas", "2")
    generate(out, *args, env=env)
    first = snapshot(out)
    again = generate(out, *args, env=env)
    assert snapshot(out) == first
    assert "wrote" not in again.stdout
    assert again.stdout.count("unchanged") == len(first) - 1  # every file but the manifest


@pytest.mark.parametrize("gpus,tp", SHAPES, ids=[f"gpus{g}-tp{t}" for g, t in SHAPES])
def test_docker_compose_accepts_the_vllm_file(tmp_path, env, adapter, gpus, tp):
    compose = require_tool("docker-compose")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), *shape_args(gpus, tp), "--replicas", "2", env=env)
    # the operator's step: one key on both lines of vllm.env (the YAML itself never holds it)
    key_file = out / "vllm.env"
    key_file.write_text(re.sub(r"^(VLLM_API_KEY|THAI_UPSTREAM_API_KEY)=$", rf"\1={KEY}",
                               key_file.read_text(), flags=re.M))
    assert KEY not in (out / "docker-compose.vllm.yml").read_text()
    result = subprocess.run([compose, "-f", "docker-compose.vllm.yml", "config"], cwd=out,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    names = [f"vllm-{i}" for i in range(gpus // tp)]
    assert sorted(services) == sorted(names + ["thai-model-api"])
    seen: list[str] = []
    for index, name in enumerate(names):
        vllm = services[name]
        assert vllm["image"] == "vllm/vllm-openai:v0.19.1"
        gpu = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert len(gpu) == 1 and gpu[0]["driver"] == "nvidia" and gpu[0]["capabilities"] == ["gpu"]
        assert gpu[0]["device_ids"] == [str(g) for g in range(index * tp, (index + 1) * tp)]
        seen += gpu[0]["device_ids"]
        command = vllm["command"]
        assert command[0] == "Qwen/Qwen2.5-1.5B-Instruct"  # the base model; vllm serve's positional argument
        assert command[command.index("--tensor-parallel-size") + 1] == str(tp)
        assert "--enable-lora" in command
        assert command[command.index("--lora-modules") + 1] == "thai-prod=/models/adapter"
        assert command[command.index("--served-model-name") + 1] == "Qwen/Qwen2.5-1.5B-Instruct"
        assert command[command.index("--max-lora-rank") + 1] == "16"
        assert command[-2:] == ["--port", "8000"]
        assert f"{adapter}:/models/adapter:ro" in vllm["volumes"]
        assert "/health" in " ".join(vllm["healthcheck"]["test"])
        assert "ports" not in vllm  # only the app reaches vLLM, over the vllm network
        assert list(vllm["networks"]) == ["vllm"]
        assert vllm["environment"]["VLLM_API_KEY"] == KEY  # from vllm.env
        assert vllm["environment"]["VLLM_NO_USAGE_STATS"] == "1"
    assert seen == [str(g) for g in range(gpus)]  # every GPU once
    app = services["thai-model-api"]
    environment = app["environment"]
    assert environment["THAI_ENGINE"] == "openai"
    assert environment["THAI_UPSTREAM_URLS"].split(",") == [f"http://{name}:8000" for name in names]
    assert environment["THAI_UPSTREAM_MODEL"] == "thai-prod"
    assert environment["THAI_UPSTREAM_API_KEY"] == KEY  # from vllm.env as well
    assert environment["THAI_TOKENIZER"] == "/models/adapter"
    assert f"{adapter}:/models/adapter:ro" in app["volumes"]
    assert app["depends_on"] == {name: {"condition": "service_healthy"} for name in names}
    assert "resources" not in app["deploy"]  # the app needs no GPU
    assert app["ports"] == ["127.0.0.1:9100-9101:9100/tcp"]
    assert "/ready" in " ".join(app["healthcheck"]["test"])
    assert sorted(app["networks"]) == ["app", "vllm"]
    # the app accepts what Compose hands it
    settings = app_settings({k: str(v) for k, v in environment.items()}, tmp_path)
    assert settings["engine"] == "openai" and settings["urls"] == [f"http://{name}:8000" for name in names]
    assert settings["key"] == KEY


def test_compose_entrypoint_refuses_an_empty_key(tmp_path, env):
    """The entrypoint in front of `vllm serve`, run with /bin/sh and a stand-in vllm."""
    compose = require_tool("docker-compose")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), *shape_args(1, 1), env=env)
    config = subprocess.run([compose, "-f", "docker-compose.vllm.yml", "config"], cwd=out,
                            capture_output=True, text=True, timeout=120)
    assert config.returncode == 0, config.stderr
    service = yaml.safe_load(config.stdout)["services"]["vllm-0"]
    entrypoint = [part.replace("$$", "$") for part in service["entrypoint"]]  # Compose's escape
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/sh\necho "vllm $*"\n')
    (bin_dir / "vllm").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    empty = subprocess.run([*entrypoint, *service["command"]], env={"PATH": path, "VLLM_API_KEY": ""},
                           capture_output=True, text=True, timeout=30)
    assert empty.returncode == 1 and "VLLM_API_KEY is empty" in empty.stderr
    keyed = subprocess.run([*entrypoint, *service["command"]], env={"PATH": path, "VLLM_API_KEY": KEY},
                           capture_output=True, text=True, timeout=30)
    assert keyed.returncode == 0, keyed.stderr
    assert keyed.stdout.strip() == "vllm serve " + " ".join(service["command"])


def test_systemd_accepts_the_vllm_units_and_rates_them_safe(tmp_path, env, adapter, vllm_bin):
    analyze = require_tool("systemd-analyze")
    install = tmp_path / "opt" / "thai-model-api"
    (install / ".venv" / "bin").mkdir(parents=True)
    (install / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (install / "app.py").write_text("")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install), *shape_args(4, 2), "--replicas", "2",
             "--vllm-bin", str(vllm_bin), env=env)
    units = ["vllm-openai@.service", "thai-model-api.service", "thai-model-api@.service"]
    verify = subprocess.run([analyze, "verify", *units], cwd=out, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr + verify.stdout
    assert verify.stderr.strip() == "", verify.stderr  # the drop-in included: no unknown or bad lines
    unit = (out / "vllm-openai@.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={vllm_bin} serve Qwen/Qwen2.5-1.5B-Instruct ")
    assert f"--lora-modules thai-prod={adapter} " in exec_start and "--enable-lora" in exec_start
    assert exec_start.endswith("--tensor-parallel-size 2 --generation-config vllm --host 127.0.0.1 --port %i")
    assert "EnvironmentFile=/etc/vllm-openai/vllm.env\nEnvironmentFile=/etc/vllm-openai/%i.env\n" in unit
    assert 'ExecStartPre=/usr/bin/test -n "${VLLM_API_KEY}"' in unit  # no key, no start
    # one instance per replica, on its own GPUs
    assert (out / "vllm-openai" / "8100.env").read_text().splitlines()[-1] == "CUDA_VISIBLE_DEVICES=0,1"
    assert (out / "vllm-openai" / "8101.env").read_text().splitlines()[-1] == "CUDA_VISIBLE_DEVICES=2,3"
    dropin = (out / "thai-model-api.service.d" / "vllm.conf").read_text()
    assert "After=vllm-openai@8100.service vllm-openai@8101.service" in dropin
    assert "EnvironmentFile=/etc/vllm-openai/vllm.env" in dropin
    # the instance the operator enables, rated by systemd itself
    instance = tmp_path / "rate" / "vllm-openai@8100.service"
    instance.parent.mkdir()
    instance.write_text(unit)
    security = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(instance)],
                              capture_output=True, text=True, timeout=120)
    report = security.stdout + security.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert match, report
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "systemd-security-vllm.txt").write_text(report)
    print(f"systemd-analyze security exposure (vllm-openai@8100): {match.group(1)}")
    assert float(match.group(1)) <= 2.0, report
    device_line = next(line for line in report.splitlines() if "DeviceAllow=" in line)
    assert "char-nvidia*:rw" in device_line and "/dev/nvidiactl:rw" in device_line
    for setting in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateUsers="):
        line = next(line for line in report.splitlines() if line[2:].startswith(setting))
        assert line[0] in "✓+", line
    # the app's env file for this mode, with the key from vllm.env, as the app reads them
    environment = {**read_env_file(out / "thai-model-api.vllm.env"), "THAI_UPSTREAM_API_KEY": KEY}
    settings = app_settings(environment, tmp_path)
    assert settings == {"engine": "openai", "urls": ["http://127.0.0.1:8100", "http://127.0.0.1:8101"],
                        "model": "thai-prod", "tokenizer": str(adapter), "key": KEY}


@pytest.mark.parametrize("gpus,tp", SHAPES, ids=[f"gpus{g}-tp{t}" for g, t in SHAPES])
def test_kubernetes_validate_accepts_the_manifests(tmp_path, env, gpus, tp):
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), *shape_args(gpus, tp), "--replicas", "2",
             "--app-image", "registry.example.com/thai-model-api:1.0", env=env)
    manifests = sorted((out / "k8s").glob("*.yaml"))
    assert [p.name for p in manifests] == ["00-namespace.yaml", "10-storage.yaml", "20-vllm.yaml", "30-app.yaml"]
    # strict: unknown fields are errors; offline, against the schemas the package ships
    validate = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.29.0",
                               "-k", "1.37.0", *map(str, manifests)], capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert validate.stdout.count("passed") == 2 * 8, validate.stdout  # 8 objects, 2 versions
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for p in manifests for doc in yaml_documents(p)}
    assert all(doc["metadata"].get("namespace", "thai-llm") == "thai-llm" for doc in objects.values())
    assert not any(kind == "Secret" for kind, _ in objects)  # the key is created by kubectl, never a file
    vllm = objects[("Deployment", "vllm-openai")]["spec"]
    assert vllm["replicas"] == gpus // tp
    pod = vllm["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "vllm/vllm-openai:v0.19.1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tp
    args = container["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == str(tp)
    assert args[args.index("--lora-modules") + 1] == "thai-prod=/models/adapter"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    key_ref = next(e for e in container["env"] if e["name"] == "VLLM_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "vllm-api-key", "key": "api-key"}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"thai-model-files"} and ("PersistentVolumeClaim", "thai-model-files") in objects
    service = objects[("Service", "vllm-openai")]["spec"]
    assert service["selector"] == vllm["selector"]["matchLabels"] and service["ports"][0]["port"] == 8000
    policy = objects[("NetworkPolicy", "vllm-openai")]["spec"]
    assert policy["podSelector"]["matchLabels"] == vllm["selector"]["matchLabels"]
    app = objects[("Deployment", "thai-model-api")]["spec"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == app["selector"]["matchLabels"]
    app_container = app["template"]["spec"]["containers"][0]
    assert app_container["image"] == "registry.example.com/thai-model-api:1.0"
    environment = {e["name"]: e.get("value", e.get("valueFrom")) for e in app_container["env"]}
    assert environment["THAI_ENGINE"] == "openai"
    assert environment["THAI_UPSTREAM_URLS"] == "http://vllm-openai:8000"  # the Service above
    assert environment["THAI_UPSTREAM_API_KEY"] == {"secretKeyRef": key_ref}
    assert environment["THAI_UPSTREAM_MODEL"] == "thai-prod" and environment["THAI_TOKENIZER"] == "/models/adapter"
    assert app_container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # the app's /health is 503 while no vLLM replica is healthy: restarting the app would not help
    assert "tcpSocket" in app_container["livenessProbe"] and "tcpSocket" in app_container["startupProbe"]
    assert app_container["resources"]["requests"]["cpu"]  # the HorizontalPodAutoscaler's yardstick
    assert "nvidia.com/gpu" not in app_container["resources"].get("limits", {})
    hpa = objects[("HorizontalPodAutoscaler", "thai-model-api")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "thai-model-api"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    plain = {k: v for k, v in environment.items() if isinstance(v, str)}
    settings = app_settings({**plain, "THAI_UPSTREAM_API_KEY": KEY}, tmp_path)
    assert settings["engine"] == "openai" and settings["urls"] == ["http://vllm-openai:8000"]


def test_the_key_never_appears_literally(tmp_path, env):
    """Keys in the operator's environment stay out of every generated file."""
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), *shape_args(2, 1),
             env={**env, "THAI_UPSTREAM_API_KEY": KEY, "VLLM_API_KEY": KEY, "THAI_API_KEYS": KEY + "-client"})
    leaks = [path for path, data in snapshot(out).items() if KEY.encode() in data]
    assert leaks == []
    assert read_env_file(out / "vllm.env") == {"VLLM_API_KEY": "", "THAI_UPSTREAM_API_KEY": ""}


def test_bad_vllm_options_are_refused_in_one_line(tmp_path, env, adapter):
    out = tmp_path / "out"

    def refused(*args: str, settings: dict[str, str] | None = None) -> str:
        result = generate(out, "--install-dir", str(REPO), *args, env=settings or env, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
        return result.stderr

    message = refused(*shape_args(3, 2))  # 3 GPUs do not split into replicas of 2
    assert "--tensor-parallel-size" in message and "--gpus 3" in message
    assert "--gpus: only with --engine vllm" in refused("--gpus", "2")
    assert "not latest" in refused("--engine", "vllm", "--vllm-image", "vllm/vllm-openai:latest")
    assert "--vllm-image" in refused("--engine", "vllm", "--vllm-image", "vllm/vllm-openai")  # no tag at all
    assert "--max-lora-rank" in refused("--engine", "vllm", "--max-lora-rank", "24")
    assert "overlap the app's ports" in refused(*shape_args(2, 1), "--vllm-port", "9099")
    # an adapter of a larger rank than vLLM is told to expect: the fix is in the message
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {"q_proj": 64}}))
    message = refused("--engine", "vllm")
    assert f"rank 64 of the adapter in {adapter}" in message and "--max-lora-rank 64" in message
    assert generate(out, "--install-dir", str(REPO), "--engine", "vllm", "--max-lora-rank", "64",
                    env=env).returncode == 0
