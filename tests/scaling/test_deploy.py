"""deploy/: the compose file passes the compose spec and pins one GPU per replica, nginx.conf passes
`nginx -t` and keeps the properties Label Studio needs; without Ray installed the rest still works."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
sys.path.insert(0, str(DEPLOY))
import check_nginx  # noqa: E402


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compose_file_is_valid_and_pins_one_gpu_per_replica(tmp_path: Path) -> None:
    assert check_jsonschema(DEPLOY / "docker-compose.yml").returncode == 0
    broken = compose()
    broken["services"]["ml-gpu0"]["deploy"]["resources"]["reservations"]["devices"] = "gpu0"
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema(tmp_path / "broken.yml").returncode != 0  # the check can fail

    services = compose()["services"]
    replicas = {name: s for name, s in services.items() if name.startswith("ml-gpu")}
    assert len(replicas) >= 2
    gpus = []
    for service in replicas.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and len(device["device_ids"]) == 1
        gpus.append(device["device_ids"][0])
        env = service["environment"]
        # shared state: configs seen (/versions), batch jobs; chunks of big requests go back through nginx
        assert env["MODEL_DIR"] == "/data/model_dir" and "model-dir:/data/model_dir" in service["volumes"]
        assert env["REPLICA_URLS"] == "http://nginx:9090" and int(env["SPLIT_WAYS"]) == len(replicas)
        assert env["WORKERS"] == "1" and "healthcheck" in service
    assert sorted(gpus) == [str(i) for i in range(len(replicas))]
    nginx = services["nginx"]
    assert nginx["ports"] == ["9090:9090"] and "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == set(replicas)

    conf = (DEPLOY / "nginx.conf").read_text()
    upstream = re.search(r"upstream ml_backend \{(.*?)\n    \}", conf, re.S)
    assert upstream is not None
    directives = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert "least_conn;" in upstream.group(1) and not any(d.startswith("ip_hash") for d in directives)
    assert "zone ml_backend" in upstream.group(1)  # least_conn counts shared by the worker processes
    assert re.findall(r"server (ml-gpu\d+):9090", upstream.group(1)) == sorted(replicas)
    timeouts = [int(t) for t in re.findall(r"proxy_read_timeout (\d+)s;", conf)]
    assert timeouts and min(timeouts) > 100  # Label Studio waits 100 s for /predict


def test_nginx_accepts_the_config_and_the_check_can_fail(tmp_path: Path) -> None:
    if check_nginx.nginx_binary() is None:
        pytest.skip("nginx is not installed (make test installs Debian's nginx)")
    assert check_nginx.check() == 0
    broken = tmp_path / "nginx.conf"
    broken.write_text((DEPLOY / "nginx.conf").read_text().replace("least_conn;", "least_connections;"))
    assert check_nginx.check(broken) != 0


def test_without_ray_installed_everything_imports_and_engine_ray_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import model, serving.http.app, serving.cli.main, serving.jobs.engines.ray\n"
        "from serving.jobs.engines import ray_installed\n"
        "from serving.settings import Settings\n"
        "app = model.create_app(Settings(model_dir=sys.argv[1], ray_address='auto'))\n"
        "print(ray_installed(), app.extensions['lsml_jobs'].engines, 'ray' in sys.modules and sys.modules['ray'] is not None)\n"
        "app.extensions['lsml_jobs'].close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "md")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "False ('local',) False"
    assert "RAY_ADDRESS is set but the Ray engine needs Ray" in done.stderr

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.xml").write_text(
        '<View><Labels name="l" toName="t"><Label value="A"/></Labels><Text name="t" value="$text"/></View>'
    )
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with caplog.at_level(logging.ERROR):
        rc = cli.main(
            ["predict", "--config", "c.xml", "--input", "t.jsonl", "--output", "o.json", "--engine", "ray"],
            families=lambda: {},
        )
    assert rc == cli.EXIT_USAGE
    assert "pip install -r requirements-ray.txt" in caplog.text
