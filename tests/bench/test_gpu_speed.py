"""The GPU speed benchmark's two halves run end to end on a tiny random model on CPU: `measure`
pairs sharedllm with full attention per length, `report` writes the section and plots."""

from __future__ import annotations

import json

from bench import gpu_speed


def test_measure_then_report_on_a_tiny_model(tmp_path):
    results = tmp_path / "gpu.json"
    assert (
        gpu_speed.main(
            [
                "measure",
                "--out",
                str(results),
                "--configs",
                "tiny",
                "--lengths",
                "1024,2048",
                "--device",
                "cpu",
                "--vs-transformers",
                "256",
            ]
        )
        == 0
    )
    data = json.loads(results.read_text())
    rows = data["models"][0]["rows"]
    assert [r["tokens"] for r in rows] == [1024, 2048]
    for r in rows:
        assert r["memory_positions"] == r["tokens"] // 8  # L/8 positions per full chunk
        assert r["full_ttft_s"] > 0 and r["sharedllm_ram_ttft_s"] > 0
        assert abs(r["ttft_speedup_ram"] - r["full_ttft_s"] / r["sharedllm_ram_ttft_s"]) < 1e-9
    [vs] = data["models"][0]["vs_transformers"]  # same weights: the same greedy tokens (fp32 on CPU)
    assert vs["compared_tokens"] == 32 and vs["greedy_tokens_agree"] == 32 and vs["hf_ttft_s"] > 0
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n")
    assert gpu_speed.main(["report", str(results), "--md", str(md), "--raw-dir", str(tmp_path)]) == 0
    text = md.read_text()
    assert "<!-- bench:gpu:start -->" in text and "tiny (random weights)" in text
    assert "our decoder vs transformers' generate" in text
    decode = data["models"][0]["decode"]
    assert decode["eager_tok_s"] > 0 and decode["weight_bytes"] > 0 and "compiled_tok_s" not in decode
    assert "HBM bound tok/s" in text
    assert (tmp_path / "img" / "gpu-ttft-tiny.png").stat().st_size > 1000
