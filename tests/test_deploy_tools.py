"""The production generator and commands, each output accepted by its real tool.

nginx -t, systemd-analyze verify / security, promtool and docker-compose (Debian
packages that ``.ci/run`` installs) judge the generated files; the host and
API-check commands run against real processes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.preflight import estimate_parameters, memory_verdict
from tests.deploy_support import generate, nginx_test, nginx_wrapper, self_signed_certificate
from tests.support import ARTIFACTS, REPO, ServerProcess, free_port, require_tool, run_python

SETTINGS_ENV = {"THAI_PORT": "9100", "THAI_MAX_REQUEST_BYTES": "65536", "THAI_SERVED_MODEL_NAME": "thai-prod"}
OUTPUTS = ["thai-model-api.service", "thai-model-api@.service", "thai-model-api.nginx", "thai-model-api.env",
           "docker-compose.prod.yml", "Dockerfile", "monitoring/prometheus.yml", "monitoring/alerts.yml",
           "start_api.sh"]


@pytest.fixture
def install_dir(tmp_path):
    """A stand-in install folder whose venv python exists, so systemd-analyze verify can check it."""
    root = tmp_path / "opt" / "thai-model-api"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (root / "app.py").write_text("")
    return root


def snapshot(out_dir) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def test_generator_writes_every_file_from_the_server_settings(tmp_path, install_dir):
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install_dir), "--replicas", "3", "--domain", "api.example.com",
             env=SETTINGS_ENV)
    assert sorted(OUTPUTS) == sorted(p for p in snapshot(out) if p != ".generated.json")
    site = (out / "thai-model-api.nginx").read_text()
    assert "client_max_body_size 65536;" in site  # = THAI_MAX_REQUEST_BYTES
    assert re.findall(r"server 127\.0\.0\.1:(\d+)", site) == ["9100", "9101", "9102"]
    assert not re.search(r"^\s*[^#\s].*X-Frame-Options", site, re.M)  # only the comment says why
    unit = (out / "thai-model-api.service").read_text()
    assert f"ExecStart={install_dir}/.venv/bin/python {install_dir}/app.py --require-model " \
           "--host 127.0.0.1 --port 9100" in unit
    assert "Environment=THAI_REQUIRE_MODEL=true" in unit
    env_file = (out / "thai-model-api.env").read_text()
    assert "THAI_SERVED_MODEL_NAME=thai-prod" in env_file and "THAI_MAX_REQUEST_BYTES=65536" in env_file
    # nginx on loopback is the one proxy whose X-Forwarded-* the app believes (systemd reads this file)
    assert "\nTHAI_FORWARDED_ALLOW_IPS=127.0.0.1\n" in env_file
    assert f"EnvironmentFile={'/etc/thai-model-api/thai-model-api.env'}" in unit
    assert os.stat(out / "start_api.sh").st_mode & 0o777 == 0o755
    assert os.stat(out / "thai-model-api.env").st_mode & 0o777 == 0o640


def test_running_twice_gives_identical_files(tmp_path, install_dir):
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install_dir), "--replicas", "2", env=SETTINGS_ENV)
    first = snapshot(out)
    second_run = generate(out, "--install-dir", str(install_dir), "--replicas", "2", env=SETTINGS_ENV)
    assert snapshot(out) == first
    assert "wrote" not in second_run.stdout and second_run.stdout.count("unchanged") == len(OUTPUTS)


def test_operator_edits_are_kept_unless_force(tmp_path, install_dir):
    out = tmp_path / "out"
    args = ("--install-dir", str(install_dir))
    generate(out, *args, env=SETTINGS_ENV)
    site = out / "thai-model-api.nginx"
    edited = site.read_text() + "# operator: extra allow list\n"
    site.write_text(edited)
    (out / "thai-model-api.env").write_text("THAI_API_KEYS=secret-key-123\n")
    # a settings change: untouched files follow it, edited files stay as the operator left them
    changed = generate(out, *args, env={**SETTINGS_ENV, "THAI_MAX_REQUEST_BYTES": "131072"})
    assert site.read_text() == edited
    assert (out / "thai-model-api.env").read_text() == "THAI_API_KEYS=secret-key-123\n"
    assert "KEPT       thai-model-api.nginx" in changed.stderr and "--force" in changed.stderr
    assert "wrote      monitoring/prometheus.yml" not in changed.stdout  # same content: untouched
    # a file the generator never wrote is not ours to replace either
    (out / "monitoring" / "alerts.yml").unlink()
    (out / ".generated.json").write_text("{}")
    (out / "monitoring" / "alerts.yml").write_text("groups: []\n")
    generate(out, *args, env=SETTINGS_ENV)
    assert (out / "monitoring" / "alerts.yml").read_text() == "groups: []\n"
    forced = generate(out, *args, "--force", env={**SETTINGS_ENV, "THAI_MAX_REQUEST_BYTES": "131072"})
    assert "client_max_body_size 131072;" in site.read_text()
    assert "THAI_API_KEYS=secret-key-123" not in (out / "thai-model-api.env").read_text()
    assert "KEPT" not in forced.stderr
    manifest = json.loads((out / ".generated.json").read_text())["files"]
    assert set(manifest) == set(OUTPUTS) - {"thai-model-api@.service"}


def test_bad_options_are_refused_in_one_line(tmp_path):
    result = generate(tmp_path / "out", "--sub-path", "thai/", "--replicas", "0", check=False)
    assert result.returncode == 2
    assert "--sub-path" in result.stderr and "--replicas" in result.stderr
    assert not (tmp_path / "out").exists()
    for subnet in ("8.8.8.0/24", "172.31.240.0/30", "172.31.240.1/24"):  # public, tiny, host bits
        result = generate(tmp_path / "out", "--docker-subnet", subnet, check=False)
        assert result.returncode == 2 and "--docker-subnet" in result.stderr, subnet


def test_the_generator_imports_neither_the_web_stack_nor_the_model():
    # an operator's `setup_production.py` reads the settings and writes files: FastAPI,
    # torch and Gradio would triple its start for nothing
    probe = ("import sys, runpy; sys.argv = ['setup_production.py', '--help']\n"
             "try:\n    runpy.run_path('deploy/setup_production.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('loaded:', sorted(m for m in ('fastapi', 'starlette', 'torch', 'gradio', "
             "'transformers') if m in sys.modules))")
    result = run_python(probe)
    assert result.stdout.splitlines()[-1] == "loaded: []", result.stdout + result.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_nginx_accepts_the_site(tmp_path, install_dir, tls):
    cert, key = self_signed_certificate(tmp_path)
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install_dir), "--replicas", "2", "--sub-path", "/thai",
             "--domain", "localhost", "--ssl-certificate", str(cert), "--ssl-certificate-key", str(key),
             "--tls" if tls else "--no-tls", env=SETTINGS_ENV)
    result = nginx_test(nginx_wrapper(tmp_path / "nginx", out / "thai-model-api.nginx"))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_systemd_accepts_the_units_and_rates_them_safe(tmp_path, install_dir):
    analyze = require_tool("systemd-analyze")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install_dir), "--replicas", "2", "--api-key-file",
             "/etc/thai-model-api/api-keys", env=SETTINGS_ENV)
    units = [str(out / "thai-model-api.service"), str(out / "thai-model-api@.service")]
    verify = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr + verify.stdout
    security = subprocess.run([analyze, "security", "--offline=true", "--no-pager", units[0]],
                              capture_output=True, text=True, timeout=120)
    report = security.stdout + security.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert match, report
    score = float(match.group(1))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "systemd-security.txt").write_text(report)
    print(f"systemd-analyze security exposure: {score}")
    assert score <= 2.0, report
    device_line = next(line for line in report.splitlines() if "DeviceAllow=" in line)
    assert "char-nvidia*:rw" in device_line and "/dev/nvidiactl:rw" in device_line  # the GPU stays reachable
    for setting in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateUsers="):
        line = next(line for line in report.splitlines() if line[2:].startswith(setting))
        assert line[0] in "✓+", line  # passed (✓, or + without a UTF-8 locale): no exposure added


def test_promtool_accepts_the_prometheus_files(tmp_path, install_dir):
    promtool = require_tool("promtool")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(install_dir), "--replicas", "2", env=SETTINGS_ENV)
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=out / "monitoring",
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 1 rule files found" in config.stdout
    prometheus = yaml.safe_load((out / "monitoring" / "prometheus.yml").read_text())
    scrape = prometheus["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == ["127.0.0.1:9100", "127.0.0.1:9101"]


def test_docker_compose_accepts_the_compose_file(tmp_path, install_dir):
    compose = require_tool("docker-compose")
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), "--replicas", "3", env=SETTINGS_ENV)
    result = subprocess.run([compose, "-f", "docker-compose.prod.yml", "config"], cwd=out,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["thai-model-api"]
    gpu = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "/ready" in " ".join(service["healthcheck"]["test"])
    assert service["ports"] == ["127.0.0.1:9100-9102:9100/tcp"]  # loopback only: nginx is the public face
    assert service["environment"]["THAI_REQUIRE_MODEL"] == "true"
    # Through Docker's published port nginx's connections come from the network's gateway.
    assert service["environment"]["THAI_FORWARDED_ALLOW_IPS"] == "172.31.240.1"
    network = yaml.safe_load(result.stdout)["networks"]["app"]["ipam"]["config"][0]
    assert network == {"subnet": "172.31.240.0/24", "gateway": "172.31.240.1"}
    assert list(service["networks"]) == ["app"]
    assert any(v.endswith(":/cache:rw") for v in service["volumes"])  # Hugging Face cache volume
    assert any(v.endswith(":/models/adapter:ro") for v in service["volumes"])
    # every file the Dockerfile copies exists in the build context
    dockerfile = (Path(service["build"]["context"]) / service["build"]["dockerfile"]).read_text()
    sources = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert sources and all((REPO / source).exists() for source in sources), sources


def test_memory_estimate_matches_qwen_and_suggests_8bit():
    qwen_1_5b = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                 "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                 "tie_word_embeddings": True}
    parameters = estimate_parameters(qwen_1_5b)
    assert 1.50e9 < parameters < 1.56e9  # Qwen2.5-1.5B has 1.54 B parameters
    gib = 1024**3
    short = memory_verdict(parameters, "bfloat16", 3 * gib, 8 * gib, "GPU 0")
    assert short.status == "fail"
    assert "THAI_QUANTIZATION=8bit" in short.message and "THAI_DEVICE=cpu" in short.message
    assert memory_verdict(parameters, "bfloat16", 40 * gib, 80 * gib, "GPU 0").status == "ok"


def run_host(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "manage.sh"), *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_host_checks_name_the_process_holding_the_port(model_env):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_host(["check", "--host", "127.0.0.1", "--port", str(port)], model_env)
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stdout
    assert f"by PID {os.getpid()}" in result.stdout and f"kill {os.getpid()}" in result.stdout


def test_host_checks_report_a_missing_adapter(model_env, tmp_path):
    incomplete = tmp_path / "adapter"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text("{}")
    result = run_host(["check", "--lora-path", str(incomplete), "--port", str(free_port())], model_env)
    assert result.returncode == 1
    assert f"Thai model not found at {incomplete}: the folder lacks adapter_model.safetensors" in result.stdout
    dev = run_host(["check", "--lora-path", str(incomplete), "--no-require-model",
                    "--port", str(free_port())], model_env)
    assert dev.returncode == 0 and "fall back to the demo checkpoint" in dev.stdout


def test_host_api_checks_then_becomes_the_server(model_env, tmp_path):
    port = free_port()
    log_path = tmp_path / "host.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(REPO / "manage.sh"), "host-api", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-enable-ui"],
                                cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **model_env},
                                stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert proc.poll() is None, server.log()
        import psutil

        assert "app.py" in " ".join(psutil.Process(proc.pid).cmdline())  # exec: same PID, now the server
        assert "pre-flight checks:" in server.log() and "FAIL" not in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_start_script_runs_the_checks(tmp_path, model_env):
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), "--python", sys.executable)
    script = out / "start_api.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    log_file = tmp_path / "api.log"
    result = subprocess.run([str(script), "--check-only", "--port", str(free_port())],
                            env={**os.environ, **model_env, "THAI_LOG_FILE": str(log_file)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    adapter" in log_file.read_text()


def test_api_client_checks_every_endpoint(live_server):
    result = subprocess.run([str(REPO / "manage.sh"), "test-api", "--url", live_server.url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for endpoint in ("GET /", "GET /health", "GET /v1/models", "POST /v1/chat/completions",
                     "POST /v1/chat/completions stream", "POST /v1/summarize", "GET /docs", "GET /redoc",
                     "GET /metrics"):
        assert re.search(rf"^{re.escape(endpoint)} +200 +\d+ ms +ok", result.stdout, re.M), endpoint
    assert "checks passed" in result.stdout and "failed" not in result.stdout


def test_api_client_fails_on_a_dead_server():
    result = subprocess.run([str(REPO / "manage.sh"), "test-api", "--url", f"http://127.0.0.1:{free_port()}",
                             "--timeout", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "ConnectError" in result.stdout and "0 of" in result.stdout
