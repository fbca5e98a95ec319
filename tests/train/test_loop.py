"""A tiny training run on CPU must reduce the loss and resume from its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.testing import make_shared, random_transformer, tiny_config
from train.loop import TrainConfig, fit_steps_to_budget, lr_at, train


class _Tok:
    """Minimal tokenizer stand-in: LM items need no chat parsing."""

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _items(n: int, seed: int = 0) -> list[dict]:
    """Copy task: the target repeats the start of the context, so reading the memory helps."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        context = rng.integers(0, 128, 96)
        items.append({"context_ids": context, "prompt_ids": np.array([], dtype=np.int64),
                      "target_ids": context[:16].copy()})
    return items


def test_tiny_training_reduces_loss_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0), init_mode="zero")
    items = _items(8)
    cfg = TrainConfig(out=tmp_path, steps=30, lr=5e-3, warmup=3, grad_accum=1, eval_every=15, save_every=15)
    history = train(model, _Tok(), items, items[:4], cfg)
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    assert evals[-1] < evals[0] * 0.98 or np.mean(losses[-8:]) < np.mean(losses[:8]) * 0.95
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 30
    # resuming with more steps continues from step 30, not from scratch
    cfg2 = TrainConfig(out=tmp_path, steps=32, lr=5e-3, warmup=3, grad_accum=1, eval_every=100, save_every=100)
    more = train(model, _Tok(), items, [], cfg2)
    assert [h["step"] for h in more if "loss" in h][-2:] == [31, 32]


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(out=None, steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) < lr_at(9, cfg) == 1e-3
    assert abs(lr_at(99, cfg) - 1e-4) < 2e-5 and lr_at(50, cfg) < 1e-3


def test_export_casts_to_bf16_keeps_metadata_and_adds_the_warning(tmp_path):
    import torch

    from model.sharedllm import SharedLLM
    from model.testing import make_shared, random_transformer, tiny_config
    from train.export import export_weights

    shared = make_shared(random_transformer(tiny_config(vocab_size=128)), init_mode="copy")
    shared.save_pretrained(tmp_path / "run", extra={"steps": 7})
    out = export_weights(tmp_path / "run", tmp_path / "assets", warning="small scale")
    assert SharedLLM.weights_info(out) == {"steps": 7, "warning": "small scale"}
    loaded = SharedLLM.from_pretrained(random_transformer(tiny_config(vocab_size=128)), out)
    for (name, a), (_, b) in zip(shared.xattn.state_dict().items(), loaded.xattn.state_dict().items()):
        assert b.dtype == torch.float32  # cast back to the model's dtype on load
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)


def test_time_budget_shrinks_the_schedule_to_what_fits(tmp_path):
    cfg = TrainConfig(out=tmp_path, steps=1000, time_budget_s=100.0)
    fit_steps_to_budget(cfg, step=20, elapsed=10.0, start=0)  # 0.5 s/step, 85 s left -> 170 more
    assert cfg.steps == 20 + 170
    fit_steps_to_budget(cfg, step=40, elapsed=20.0, start=0, per_step=0.25, ceiling=1000)  # warmed up: faster
    assert cfg.steps == 40 + 300
    fit_steps_to_budget(cfg, step=40, elapsed=20.0, start=0, per_step=0.01, ceiling=1000)  # never past the ask
    assert cfg.steps == 1000


def test_training_stops_at_its_time_budget_and_saves(tmp_path):
    torch.manual_seed(0)
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0), init_mode="zero")
    cfg = TrainConfig(out=tmp_path, steps=10_000, lr=5e-3, warmup=3, grad_accum=1, eval_every=10_000,
                      save_every=10_000, time_budget_s=3.0, calibration_steps=5)
    history = train(model, _Tok(), _items(8), [], cfg)
    steps = [h["step"] for h in history if "loss" in h]
    assert 5 <= steps[-1] < 10_000 and cfg.steps == steps[-1]
    assert history[-1]["elapsed_s"] < 6.0
    saved = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert saved["step"] == steps[-1]


def test_training_refuses_shards_tokenized_for_another_model(tiny_model):
    """The default model changed (Qwen2.5, 151K vocabulary): shards made with SmolLM2's tokenizer
    must not be trained on it silently."""
    import pytest

    from train.cli import check_shards_match

    vocab = len(tiny_model.tokenizer)  # SmolLM2's tokenizer (model.testing)
    check_shards_match({"tokenizer": tiny_model.name, "vocab_size": vocab}, tiny_model, "shards")
    with pytest.raises(SystemExit, match="tokenized for Qwen2.5-Coder-0.5B-Instruct"):
        check_shards_match({"tokenizer": "Qwen2.5-Coder-0.5B-Instruct", "vocab_size": 151665}, tiny_model, "shards")


def test_gradient_checkpointing_stays_on_after_evaluation(tmp_path, monkeypatch):
    """Regression: the loop never put the model back in training mode after `evaluate()` (and loaders
    hand out eval-mode models), so the decoder's checkpointing branch was never taken."""
    import model.decoder as decoder

    calls = []
    real = decoder.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "checkpoint", counting)
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0), init_mode="zero")
    cfg = TrainConfig(out=tmp_path, steps=4, lr=1e-3, warmup=1, grad_accum=1, eval_every=2, save_every=100,
                      gradient_checkpointing=True)
    train(model, _Tok(), _items(4), _items(2, seed=1), cfg)
    # every training forward (4 steps x 1 item) recomputes each of the 4 layers; evaluation never does
    assert len(calls) == 4 * model.base.config.n_layer


def test_batched_training_reduces_loss_and_records_the_reading_gap(tmp_path):
    torch.manual_seed(0)
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0), init_mode="zero")
    items = _items(8)
    cfg = TrainConfig(out=tmp_path, steps=20, lr=5e-3, warmup=2, grad_accum=1, batch_items=4, eval_every=10,
                      save_every=10)
    history = train(model, _Tok(), items, items[:4], cfg)
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) * 0.95
    evals = [h for h in history if "eval_loss" in h]
    assert evals[0]["reading_gap"] == 0.0  # zero init: the memory adds nothing, whichever document
    assert [h["items"] for h in history if "loss" in h][-1] == 20 * 4
    saved = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert saved["cursor"] == 3 * 8 * 4 and saved["config"]["batch_items"] == 4  # pools of 8 micro-batches
    assert json.loads((tmp_path / "recipe.json").read_text())["key_rotation"] == "node_and_chunk"


def test_reading_gap_compares_own_and_another_items_document(tmp_path):
    from train.loop import item_loss, reading_gap

    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=0), init_mode="copy")
    items = [{**it, "task": task} for it, task in zip(_items(3), ("lm", "needle", "needle"))]
    cfg = TrainConfig(out=tmp_path)
    gap = reading_gap(model, items, _Tok(), cfg)
    with torch.no_grad():
        own0 = float(item_loss(model, items[0], _Tok(), cfg, None))
        other0 = float(item_loss(model, {**items[0], "context_ids": items[1]["context_ids"]}, _Tok(), cfg, None))
    assert gap["tasks"]["lm"]["own"] == pytest.approx(own0) and gap["tasks"]["lm"]["other"] == pytest.approx(other0)
    assert gap["gap"] == pytest.approx(gap["other"] - gap["own"]) and gap["gap"] != 0
    assert gap["tasks"]["needle"]["items"] == 2
    # the batched evaluation path measures the same
    batched = reading_gap(model, items, _Tok(), TrainConfig(out=tmp_path, batch_items=2))
    assert batched["gap"] == pytest.approx(gap["gap"], abs=1e-4)
    same = [{**it, "context_ids": items[0]["context_ids"]} for it in items]
    assert reading_gap(model, same, _Tok(), cfg)["gap"] == pytest.approx(0.0, abs=1e-6)
