"""The `actqkv` benchmark on a tiny model: one needle per depth, each for its own noun, every engine
asked every question, and the section's tables written."""

from __future__ import annotations

import json

from bench.actqkv_bench import needle_document, run_actqkv
from bench.run import Run
from model.testing import tiny_loaded_model


def test_every_depth_gets_its_own_needle_and_the_section_is_written(tmp_path, model_data_dir):
    lm = tiny_loaded_model(model_data_dir)
    text, items = needle_document(lm, 400, [0.1, 0.5, 0.9])
    assert [i.depth for i in items] == [0.1, 0.5, 0.9]
    assert len({i.question for i in items}) == 3 and len({i.answer for i in items}) == 3
    for item in items:
        assert text.count(item.needle) == 1  # each fact once, every one in the final document
    offsets = [text.index(i.needle) / len(text) for i in items]
    assert offsets == sorted(offsets) and abs(offsets[1] - 0.5) < 0.1
    md = tmp_path / "benchmarks.md"
    run = Run(lm=lm, command="test", md_path=md, img_dir=tmp_path / "img", raw_dir=tmp_path / "raw", max_new_tokens=3)
    run_actqkv(run, [300], [0.3, 0.7], ("actqkv", "full", "rag"), tiled_lengths=[400, 1600])
    written = md.read_text()
    assert "actqkv encode tokens/s" in written and "actqkv @ depths 0.3,0.7" in written
    raw = json.loads((tmp_path / "raw" / "actqkv.json").read_text())["raw"]
    assert len(raw["needle"]) == 6 and {r["engine"] for r in raw["needle"]} == {"actqkv", "full", "rag"}
    assert raw["speed"][0]["bytes_per_token"] > 0 and raw["speed"][0]["full_prefix_tokens"] > 0
    tiled = raw["tiled"]
    assert [r["tokens"] for r in tiled] == [400, 1600] and all(r["ttft_s"] > 0 for r in tiled)
    assert all(r["first_load_s"] >= 0 and r["first_ttft_s"] > 0 for r in tiled)
    assert all(len(r["ttft_all_s"]) == 3 and r["ttft_s"] == sorted(r["ttft_all_s"])[1] for r in tiled)  # the median
    assert "TTFT / shortest" in written


def test_single_needle_documents_hold_one_needle_each(tmp_path, model_data_dir):
    lm = tiny_loaded_model(model_data_dir)
    md = tmp_path / "benchmarks.md"
    run = Run(lm=lm, command="test", md_path=md, img_dir=tmp_path / "img", raw_dir=tmp_path / "raw", max_new_tokens=3)
    run_actqkv(run, [300], [0.3, 0.7], ("actqkv",), single_needle=True)
    raw = json.loads((tmp_path / "raw" / "actqkv.json").read_text())["raw"]
    assert [s["depths"] for s in raw["speed"]] == [[0.3], [0.7]]  # a document per depth, encoded apiece
    assert [r["depth"] for r in raw["needle"]] == [0.3, 0.7]
    assert "one document per depth, its needle alone" in md.read_text()


def test_replicates_draw_other_documents_and_add_a_per_cell_table(tmp_path, model_data_dir):
    lm = tiny_loaded_model(model_data_dir)
    first, items0 = needle_document(lm, 400, [0.5])
    again, _ = needle_document(lm, 400, [0.5], replicate=0)
    other, items1 = needle_document(lm, 400, [0.5], replicate=1)
    assert again == first  # replicate 0 is the document every earlier run measured
    assert other != first and items1[0].needle != items0[0].needle
    md = tmp_path / "benchmarks.md"
    run = Run(lm=lm, command="test", md_path=md, img_dir=tmp_path / "img", raw_dir=tmp_path / "raw", max_new_tokens=3)
    run_actqkv(run, [300], [0.3, 0.7], ("rag",), single_needle=True, replicates=[0, 1])
    raw = json.loads((tmp_path / "raw" / "actqkv.json").read_text())["raw"]
    assert [(s["replicate"], s["depths"]) for s in raw["speed"]] == [(0, [0.3]), (0, [0.7]), (1, [0.3]), (1, [0.7])]
    assert len({r["gold"] for r in raw["needle"]}) == 4  # four documents, four needles
    written = md.read_text()
    assert "needle accuracy per cell over replicates 0,1" in written and "rag right / samples" in written
    right = {d: sum(r["correct"] for r in raw["needle"] if r["depth"] == d) for d in (0.3, 0.7)}
    for d in (0.3, 0.7):
        assert f"| 300 | {d:.2f} | {right[d]}/2 |" in written


def test_a_tiled_state_has_the_requested_length_and_consistent_blocks(model_data_dir):
    from bench.actqkv_bench import tile_state
    from model.actqkv_encode import encode_stream
    from model.block_retrieval import ActQKVConfig

    lm = tiny_loaded_model(model_data_dir)
    cfg = ActQKVConfig(block_size=16, n_init=16, n_local=64, exec_block=32, budget=4, min_blocks=1, max_blocks=8,
                       state_dtype="int8")
    state = encode_stream(lm.model.base, list(range(100, 300)), cfg)
    big = tile_state(state, 1000)
    assert big.length == 1000 and big.n_blocks == 63
    assert all(k.data.shape[1] == 1000 and k.scale.shape[1] == 63 for k in big.k)
    assert all(r.shape[0] == 63 for r in big.reprs)
    import torch
    assert torch.equal(big.k[0].read(192, 208), state.k[0].read(0, 16))  # block 12 repeats block 0


def test_the_homer_section_times_the_merge_against_recomputing_and_records_peak_memory(tmp_path, model_data_dir):
    import dataclasses

    from model.homer import HomerConfig

    lm = dataclasses.replace(tiny_loaded_model(model_data_dir), homer=HomerConfig(
        chunk_tokens=256, warmup_layers=0, suffix_reserve=64, calibration_tokens=128, calibration_windows=1,
        calibration_queries=8))
    md = tmp_path / "benchmarks.md"
    run = Run(lm=lm, command="test", md_path=md, img_dir=tmp_path / "img", raw_dir=tmp_path / "raw", max_new_tokens=3)
    run_actqkv(run, [600], [0.5], ("homer", "rag"), None, key="homer")
    written = md.read_text()
    assert "merge s recomputing the leaves" in written and "homer peak RSS MB" in written
    raw = json.loads((tmp_path / "raw" / "homer.json").read_text())["raw"]
    [speed] = raw["speed"]
    assert speed["homer_pieces"] > 1 and speed["homer_bytes_per_token"] > 0
    [row] = [r for r in raw["needle"] if r["engine"] == "homer"]
    assert row["peak_rss_mb"] > 0 and row["homer_input_tokens"] > row["homer_cache_tokens"] > 0


def test_engine_knobs_reach_the_benchmarks_model_and_bad_ones_are_refused(tmp_path, model_data_dir):
    import pytest

    from app.config import ConfigError
    from bench.cli import build_parser, make_run

    args = build_parser().parse_args(["homer", "--tiny", "--data-dir", str(model_data_dir), "--out",
                                      str(tmp_path / "b.md"), "--homer", '{"chunk_tokens": 256}',
                                      "--actqkv", '{"budget": 16}'])
    run = make_run(args, "test")
    assert run.lm.homer.chunk_tokens == 256 and run.lm.actqkv.budget == 16
    bad = build_parser().parse_args(["homer", "--tiny", "--data-dir", str(model_data_dir), "--out",
                                     str(tmp_path / "b.md"), "--homer", '{"nope": 1}'])
    with pytest.raises(ConfigError, match="SHAREDLLM_HOMER"):
        make_run(bad, "test")
