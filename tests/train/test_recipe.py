"""Recipe fields are validated, map onto the SharedLLM config, and the dense LM stage comes first."""

from __future__ import annotations

import random

import numpy as np
import pytest

from model.config import ConfigError, ModelConfig
from train.loop import ItemStream, TrainConfig
from train.recipe import Recipe

QWEN_05B = ModelConfig(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, dim=896, intermediate_size=4864,
                       head_dim=64)


def test_defaults_and_layouts():
    project = Recipe().shared_config(QWEN_05B)
    assert (project.n_inject_layers, project.chunk_len, project.key_rotation) == (12, 512, "node_and_chunk")
    assert project.keep_rates == (1 / 16, 1 / 8, 1.0) and project.init_mode == "zero"
    paper = Recipe(layout="paper", init_mode="none").shared_config(QWEN_05B)
    assert (paper.n_inject_layers, paper.chunk_len, paper.init_mode) == (4, 1024, "none")


def test_storage_cost_of_leaf_rate_one():
    full_leaves = Recipe().storage(QWEN_05B)
    paper_rates = Recipe(keep_rates=(1 / 16, 1 / 8, 1 / 4)).storage(QWEN_05B)
    assert paper_rates["stored_positions_per_token"] == pytest.approx(7 / 16)
    assert full_leaves["stored_positions_per_token"] == pytest.approx(608 / 512)
    assert paper_rates["compression"] == 8 and full_leaves["compression"] == pytest.approx(512 / 160)
    # 2 (K, V) x 12 layers x 2 KV heads x 64 x 2 bytes per stored position
    assert paper_rates["bytes_per_token"] == pytest.approx(7 / 16 * 6144)


@pytest.mark.parametrize("bad", [dict(layout="llama"), dict(key_rotation="none"), dict(init_mode="random"),
                                 dict(keep_rates=(1 / 16, 1 / 8)), dict(lm_stage_items=-1),
                                 dict(lm_running_tokens=(4096, 2048)), dict(stage2_tasks=())])
def test_invalid_fields_are_refused(bad):
    with pytest.raises(ConfigError):
        Recipe(**bad)


def test_json_round_trip():
    recipe = Recipe(layout="paper", lm_stage_items=100, stage2_tasks=("needle", "passkey"))
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(ConfigError, match="unknown"):
        Recipe.from_json('{"colour": 1}')


def _item(task: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"context_ids": rng.integers(0, 99, n), "prompt_ids": rng.integers(0, 99, 0 if task == "lm" else 5),
            "target_ids": rng.integers(0, 99, 8), "task": task}


def test_dense_lm_view_keeps_the_text_and_puts_the_loss_on_every_running_token():
    item = _item("lm", 3000, 0)
    view = Recipe(lm_running_tokens=(2048, 4096)).dense_lm_view(item, random.Random(0), chunk_len=512)
    text = np.concatenate([item["context_ids"], item["target_ids"]])
    assert len(view["prompt_ids"]) == 0 and len(view["context_ids"]) >= 512
    assert 2048 <= len(view["target_ids"]) <= len(text) - 512
    assert np.array_equal(np.concatenate([view["context_ids"], view["target_ids"]]), text)


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return ""


def test_stream_gives_the_lm_stage_first_then_the_chosen_tasks():
    items = [_item(task, 1200, k) for k, task in enumerate(["lm", "needle", "contract", "needle"] * 3)]
    cfg = TrainConfig(out=None, recipe=Recipe(lm_stage_items=3, lm_running_tokens=(256, 512),
                                              stage2_tasks=("needle",)))
    stream = ItemStream(items, cfg, chunk_len=512, tokenizer=_Tok())
    first, _ = stream.take(3)
    assert [it["task"] for it in first] == ["lm-dense"] * 3
    then, _ = stream.take(4)
    assert [it["task"] for it in then] == ["needle"] * 4


def test_none_init_is_random_and_small():
    import torch

    from model.testing import make_shared, random_transformer, tiny_config

    shared = make_shared(random_transformer(tiny_config(vocab_size=128)), init_mode="none")
    for block in shared.xattn:
        assert 0.01 < float(block.o_proj.weight.detach().std()) < 0.03 and float(block.q_proj.weight.detach().std()) < 0.03
        assert torch.equal(block.norm.weight, torch.ones_like(block.norm.weight))


def test_micro_batches_are_bucketed_by_running_text_length():
    items = [_item(task, 600, k) for k, task in enumerate(["lm", "needle"] * 16)]
    for it in items:
        if it["task"] == "lm":
            it["target_ids"] = np.arange(300)
    stream = ItemStream(items, TrainConfig(out=None), chunk_len=512, tokenizer=_Tok(), bucket_pool=8)  # one pool: all 32
    for _ in range(8):
        batch, _ = stream.take(4)
        assert len({it["task"] for it in batch}) == 1  # never a short question padded to an LM item
