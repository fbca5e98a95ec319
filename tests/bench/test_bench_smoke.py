"""The smoke benchmark end to end on the tiny model: every benchmark runs, tables and plots are written
(in a temporary directory: docs/ is never touched)."""

from __future__ import annotations

import json
import time

import pytest

from bench.cli import main as bench_main


@pytest.mark.timeout(600)
def test_bench_smoke_writes_tables_and_plots(tmp_path, model_data_dir):
    out = tmp_path / "docs" / "benchmarks.md"
    started = time.perf_counter()
    rc = bench_main(["smoke", "--data-dir", str(model_data_dir), "--out", str(out), "--work-dir", str(tmp_path / "work")])
    elapsed = time.perf_counter() - started
    assert rc == 0
    text = out.read_text()
    for key in ("speed", "model", "ingest", "quality"):
        assert f"<!-- bench:{key}-smoke:start -->" in text and f"<!-- bench:{key}-smoke:end -->" in text
        raw = json.loads((tmp_path / "docs" / "results" / f"{key}-smoke.json").read_text())
        assert raw["machine"] and raw["command"].startswith("python -m bench smoke")
    assert "| 256 | sharedllm / full |" in text and "| 256 | sharedllm / rag |" in text  # ratios, pair by pair
    assert "acc, evidence past the" in text  # real-PDF QA also split at the model's window
    for name in ("speed-ttft", "speed-memory", "model-query-time", "quality-needle", "quality-qa"):
        png = tmp_path / "docs" / "img" / f"{name}-smoke.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert text.count("<!-- bench:") == 8  # one start and one end marker per benchmark
    # every figure is labelled with the machine and the command (in the Markdown next to it)
    assert text.count("- machine: ") == 4 and text.count("- command: `python -m bench smoke") == 4
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").glob("sharedllm-bench-smoke-*"))
    print(f"smoke benchmark: {elapsed:.0f} s")  # target < 60 s on an idle 2-core CPU


def test_section_is_replaced_not_appended(tmp_path):
    from bench.report import Section, Table, write_section

    md = tmp_path / "b.md"
    for value in (1, 2):
        write_section(md, Section(key="x", title="X", machine="m", command="c", weights="w",
                                  tables=[Table(["a"], [[value]])]))
    text = md.read_text()
    assert text.count("<!-- bench:x:start -->") == 1 and "| 2 |" in text and "| 1 |" not in text


def test_sharedllm_bench_subcommand_delegates(monkeypatch):
    import subprocess
    import sys
    from types import SimpleNamespace

    from app import cli

    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda argv, check: seen.update(argv=argv) or SimpleNamespace(returncode=0))
    assert cli.main(["bench", "speed", "--lengths", "4k", "--data-dir", "/tmp/x"]) == 0
    assert seen["argv"][:6] == [sys.executable, "-m", "bench", "speed", "--lengths", "4k"]
    assert "bench" not in {m.split(".")[0] for m in sys.modules if m.startswith("app")}


def test_the_app_never_imports_bench():
    """DESIGN: bench sits above the app; nothing in app/ imports it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "app"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "bench" or n.startswith("bench.") for n in names), path
