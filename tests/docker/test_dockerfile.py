"""The Dockerfile's build arguments, pins and runtime config, and the driver table everywhere it is told."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.context_size import excluded, parse
from scripts.image_check import MIN_DRIVER

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(x for x in DOCKERFILE.splitlines() if not x.lstrip().startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _args() -> dict[str, str]:
    found = {}
    for op, rest in _instructions():
        if op == "ARG":
            name, _, default = rest.partition("=")
            found[name.strip()] = default.strip()
    return found


def test_build_arguments_and_their_defaults() -> None:
    args = _args()
    assert args["TORCH_CUDA"] == "cu126" and args["TORCH_CUDA"] in MIN_DRIVER
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    assert args["WHEELHOUSE"] == "0" and args["WEIGHTS"] == "1"
    assert args["BASE"] == "python:3.11-slim-bookworm"
    run = " ".join(rest for op, rest in _instructions() if op == "RUN")
    assert "PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse" in run and "--mount=type=bind,source=wheelhouse" in run
    assert '--index-url "$TORCH_INDEX_URL"' in run
    assert 'if [ "$WEIGHTS" = 1 ]; then python -m serving weights download' in re.sub(r"\s+", " ", run)


def test_torch_pins_are_the_requirements_pins() -> None:
    reqs = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M))
    assert set(reqs) == {"torch", "torchvision"}
    for name, version in reqs.items():
        assert f"{name}=={version}" in DOCKERFILE
    assert sorted(re.findall(r"\b(torch(?:vision)?)==(\S+)", DOCKERFILE)) == sorted(reqs.items())


def test_copies_only_context_files_never_the_wheelhouse() -> None:
    rules = parse((ROOT / ".dockerignore").read_text())
    sources = []
    for op, rest in _instructions():
        if op == "COPY":
            sources += [w for w in rest.split()[:-1] if not w.startswith("--")]
    assert "." not in sources and not any(s.startswith("wheelhouse") for s in sources)
    for source in sources:
        assert (ROOT / source).exists() and not excluded(source.rstrip("/"), rules), source


def test_runtime_config_non_root_health_check_no_preload() -> None:
    ops = dict(_instructions())  # the last of each
    assert ops["USER"] == "1000"
    assert "/health" in ops["HEALTHCHECK"]
    assert "gunicorn" in ops["CMD"] and "--preload" not in ops["CMD"]
    assert not re.search(r"^FROM .*nvidia/cuda", DOCKERFILE, re.M)  # torch brings its CUDA libraries


@pytest.mark.parametrize(
    "path", ["Dockerfile", "docker-compose.yml", "deploy/docker-compose.yml", "README.md", "docs/DOCKER.md"]
)
def test_minimum_driver_per_flavour_is_told_the_same_everywhere(path: str) -> None:
    text = (ROOT / path).read_text()
    told = re.findall(r"\b(cu1\d\d)\b\D{0,30}?>=\s*(\d{3})", text)
    assert {f for f, _ in told} == {f for f, d in MIN_DRIVER.items() if d}, told
    for flavour, driver in told:
        assert MIN_DRIVER[flavour] == int(driver), (flavour, driver)


@pytest.mark.parametrize(
    ("path", "service"), [("docker-compose.yml", "ml-backend"), ("deploy/docker-compose.yml", "ml-gpu0")]
)
def test_compose_build_args_are_the_dockerfile_args_with_its_defaults(path: str, service: str) -> None:
    build = yaml.safe_load((ROOT / path).read_text())["services"][service]["build"]
    assert (ROOT / path).parent.joinpath(build["context"], "Dockerfile").resolve() == ROOT / "Dockerfile"
    args = _args()
    for name, value in build["args"].items():
        assert value == f"${{{name}:-{args[name]}}}", (name, value)
    assert set(build["args"]) == {"TORCH_CUDA", "WHEELHOUSE", "WEIGHTS"}


def test_wheelhouse_script_takes_only_the_dockerfile_flavours(tmp_path: Path) -> None:
    script = (ROOT / "scripts" / "wheelhouse.sh").read_text()
    (listed,) = re.findall(r"case \"\$flavour\" in ([^)]*)\)", script)
    assert {f.strip() for f in listed.split("|")} == set(MIN_DRIVER)
    env = {"PATH": "/usr/bin:/bin", "WHEELHOUSE_DIR": str(tmp_path / "w")}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "wheelhouse.sh"), "cu999"], env=env, capture_output=True
    )
    assert done.returncode == 2 and b"cu126, cu128, cu130 or cpu" in done.stderr
    assert not (tmp_path / "w").exists()
