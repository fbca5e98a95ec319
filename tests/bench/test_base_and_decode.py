"""The `base` and `decode` benchmarks on a tiny model: every decode variant (old torch.cat cache,
preallocated + SDPA, preallocated + grouped decode) gives the same greedy tokens, and the written
sections hold their tables."""

from __future__ import annotations

import json

from bench.decode_layout import VARIANTS, measure, run_decode
from bench.run import Run
from model.testing import tiny_loaded_model


def test_decode_variants_agree_and_the_section_is_written(tmp_path, model_data_dir):
    lm = tiny_loaded_model(model_data_dir)
    row = measure(lm, 200, steps=12)
    assert set(row["variants"]) == set(VARIANTS) and row["same_tokens"]
    assert all(len(v["tokens"]) == 12 and v["tokens_per_s"] > 0 for v in row["variants"].values())
    md = tmp_path / "benchmarks.md"
    run = Run(lm=lm, command="test", md_path=md, img_dir=tmp_path / "img", raw_dir=tmp_path / "raw")
    run_decode(run, [128], steps=4)
    assert "now / before" in md.read_text() and "memory bound tok/s" in md.read_text()
    raw = json.loads((tmp_path / "raw" / "decode.json").read_text())["raw"]
    assert raw["rows"][0]["same_tokens"] and raw["read_bandwidth_gb_s"] > 0
    # the bound counts every weight but the (untied) embedding table, plus the KV cache
    base, c = lm.model.base, lm.model.base.config
    params = sum(p.numel() for p in base.parameters()) * 4
    assert raw["rows"][0]["bytes_per_token"] == params + 2 * c.n_layer * c.n_kv_head * c.head_dim * 128 * 4


def test_reading_items_cut_a_window_around_real_evidence():
    from bench.base_model import WINDOW_CHARS, reading_items

    items = reading_items(4)
    assert len(items) == 4 and len({i.pdf for i, _ in items}) == 4  # spread over the PDFs
    for item, context in items:
        assert item.evidence in context and len(context) <= 2 * WINDOW_CHARS + len(item.evidence)
