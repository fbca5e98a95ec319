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
