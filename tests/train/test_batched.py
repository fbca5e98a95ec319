"""The batched trainer path must give the per-item path's loss and gradients (exactness anchor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.testing import make_shared, random_transformer, tiny_config
from model.tree import keep_indices
from train.batched import batch_loss, kept_slots
from train.loop import TrainConfig, item_loss, question_ids


class ChatTok:
    """Stand-in tokenizer: ids print as numbers inside a one-turn chat frame, so `question_ids`
    finds the user message and re-tokenises it to the same ids."""

    def decode(self, ids, skip_special_tokens=False):
        return "<|im_start|>user\n" + " ".join(str(int(i)) for i in ids) + "<|im_end|>\n<|im_start|>assistant\n"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}


def _items(seed: int = 0) -> list[dict]:
    """Contexts of 1-4 chunks (short last chunks, one shorter than a leaf), LM and question items."""
    rng = np.random.default_rng(seed)
    items = []
    for n_ctx, n_prompt, n_target in ((150, 0, 16), (64, 9, 5), (203, 12, 7), (37, 0, 20), (5, 6, 3)):
        items.append({"context_ids": rng.integers(0, 128, n_ctx), "prompt_ids": rng.integers(1, 128, n_prompt),
                      "target_ids": rng.integers(0, 128, n_target), "task": "x"})
    return items


def test_kept_slots_match_keep_indices():
    lengths = torch.arange(0, 300)
    for slots, rate in ((2, 1 / 16), (4, 1 / 8), (8, 1 / 4), (64, 1.0)):
        positions, valid = kept_slots(lengths, slots, rate)
        for n in lengths.tolist():
            want = keep_indices(n, slots, rate)
            assert positions[n][valid[n]].tolist() == want, (n, slots, rate)


@pytest.mark.parametrize("rotation,vector,keep", [("node_and_chunk", "mean", (1 / 16, 1 / 8, 1.0)),
                                                  ("chunk", "last", (1 / 16, 1 / 8, 1 / 4))])
def test_batched_loss_and_gradients_equal_the_per_item_path(rotation, vector, keep):
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=1), init_mode="copy",
                        key_rotation=rotation, retrieval_vector=vector, keep_rates=keep)
    params = list(model.xattn.parameters())
    tok, items, cfg = ChatTok(), _items(), TrainConfig(out=None)
    model.train()

    per_item = []
    generator = torch.Generator().manual_seed(3)
    for item in items:  # the reference: one item at a time, gradients accumulated as the loop does
        loss = item_loss(model, item, tok, cfg, generator)
        (loss / len(items)).backward()
        per_item.append(loss.detach())
    reference = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    questions = [question_ids([int(t) for t in it["prompt_ids"]], tok) for it in items]
    loss, losses = batch_loss(model, items, questions, None, torch.Generator().manual_seed(3))
    loss.backward()
    torch.testing.assert_close(losses, torch.stack(per_item), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), torch.stack(per_item).mean(), rtol=1e-5, atol=1e-5)
    for p, want in zip(params, reference):
        assert want.abs().max() > 0
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)


def test_padding_to_buckets_and_splitting_node_batches_change_nothing(monkeypatch):
    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=1), init_mode="copy")
    tok, items = ChatTok(), _items(1)
    questions = [question_ids([int(t) for t in it["prompt_ids"]], tok) for it in items]
    with torch.no_grad():
        _, plain = batch_loss(model, items, questions, None, None)
        _, padded = batch_loss(model, items, questions, None, None, pad_multiple=64)
        monkeypatch.setattr("train.batched.default_node_batch_tokens", lambda device: 70)  # 1-2 nodes a forward
        _, split = batch_loss(model, items, questions, None, None)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss():
    """torch.compile of the decoder layers and cross-attention blocks (~50 s to compile on a CPU)."""
    from train.loop import compile_blocks

    model = make_shared(random_transformer(tiny_config(vocab_size=128), seed=1), init_mode="copy")
    tok, items = ChatTok(), _items(1)
    questions = [question_ids([int(t) for t in it["prompt_ids"]], tok) for it in items]
    model.train()
    with torch.no_grad():
        _, plain = batch_loss(model, items, questions, None, None, pad_multiple=64)
        compile_blocks(model)
        _, compiled = batch_loss(model, items, questions, None, None, pad_multiple=64)
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
