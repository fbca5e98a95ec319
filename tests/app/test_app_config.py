from pathlib import Path

import pytest

from app.config import ConfigError, Settings


def test_defaults():
    s = Settings.load(environ={})
    assert s.data_dir == Path("data")
    assert s.port == 7860 and s.host == "127.0.0.1"
    assert s.resolved_database_url.startswith("sqlite:///") and s.resolved_database_url.endswith(
        "data/sharedllm.db"
    )


def test_env_then_flags():
    env = {
        "SHAREDLLM_DATA_DIR": "/tmp/x",
        "SHAREDLLM_PORT": "8000",
        "SHAREDLLM_DATABASE_URL": "postgresql+psycopg://u@h/db",
    }
    s = Settings.load(environ=env)
    assert s.data_dir == Path("/tmp/x") and s.port == 8000
    assert s.resolved_database_url == "postgresql+psycopg://u@h/db"
    s = Settings.load({"port": 9000, "data_dir": "/tmp/y", "host": None}, environ=env)
    assert s.port == 9000 and s.data_dir == Path("/tmp/y") and s.host == "127.0.0.1"


def test_invalid_values_are_named():
    with pytest.raises(ConfigError, match="SHAREDLLM_PORT"):
        Settings.load(environ={"SHAREDLLM_PORT": "abc"})
    with pytest.raises(ConfigError, match="engine"):
        Settings.load({"engine": "gpt"}, environ={})


def test_secret_not_serialised():
    s = Settings.load(environ={"SHAREDLLM_ADMIN_PASSWORD": "hunter2"})
    assert s.admin_password == "hunter2"
    assert "hunter2" not in s.to_json() and "hunter2" not in repr(s)


def test_default_engine_is_the_benchmark_winner_and_the_settings_tab_says_why():
    from app.config import DEFAULT_ENGINE
    from app.services.engines import ENGINES
    from app.ui.render import default_engine_markdown

    s = Settings.load(environ={})
    assert s.engine == DEFAULT_ENGINE and DEFAULT_ENGINE in ENGINES
    text = default_engine_markdown(s.engine)
    assert f"**{DEFAULT_ENGINE}**" in text and "benchmark" in text and "{" not in text
    other = next(e for e in ENGINES if e != DEFAULT_ENGINE)
    assert "SHAREDLLM_ENGINE" in default_engine_markdown(other)


def test_threads_setting():
    assert Settings.load(environ={"SHAREDLLM_THREADS": "2"}).threads == 2
    assert Settings.load(environ={}).threads is None
    with pytest.raises(ConfigError, match="threads"):
        Settings.load(environ={"SHAREDLLM_THREADS": "0"})


def test_omp_wait_policy_is_passive_before_torch_unless_set():
    import subprocess
    import sys

    probe = "import os, app; import torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_one_upload_limit_from_settings_to_extraction(tmp_path, tiny_model):
    """Issue 14: with max_upload_mb=500 a 300 MB PDF passed the upload check and then failed
    extraction's own 200 MB default ("too large"). The settings build the extraction limits now."""
    from app.extraction import precheck
    from app.services.context import AppContext

    big = tmp_path / "big.pdf"
    with open(big, "wb") as f:
        f.write(b"%PDF-1.4\n")
        f.truncate(300 * 2**20)  # sparse: 300 MB on paper, nothing on disk
    settings = Settings.load({"data_dir": tmp_path / "data", "max_upload_mb": 500}, environ={})
    ctx = AppContext(settings, model=tiny_model)
    try:
        ctx.ingestion.check_file(big)
        assert ctx.ingestion.limits.max_file_bytes == 500 * 2**20
        assert precheck(big, ctx.ingestion.limits) is None  # not "too large"
    finally:
        ctx.close()
    assert settings.extraction_limits().max_pages == settings.max_pages
