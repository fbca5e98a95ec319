"""The training evaluation (bench/train_eval.py): its tree shortcut is exact, and a tiny run writes
every table."""

from __future__ import annotations

import json

import torch

from bench import train_eval
from train.data.pack import write_shards


def test_spliced_chunk_tree_equals_encoding_the_spliced_document(tiny_model):
    """The needle grid encodes one haystack and re-encodes only the needle's chunk: that must be
    exactly the tree of the spliced document, truncated to the prefix."""
    lm = tiny_model
    L = lm.config.chunk_len
    hay = torch.randint(0, 5000, (5 * L,), generator=torch.Generator().manual_seed(1)).tolist()
    needle = torch.randint(5000, 6000, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    c, at = 2, 2 * L + 10
    chunk = (hay[at - 10 : at] + needle + hay[at : 3 * L])[:L]
    document = hay[: 2 * L] + chunk + hay[3 * L : 4 * L]
    fast = train_eval.tree_with_chunk(
        train_eval.tree_prefix(lm.encode_tree(hay), 4), c, lm.encode_tree(chunk)
    )
    direct = lm.encode_tree(document)
    assert fast.n_chunks == direct.n_chunks == 4
    for a, b in zip(fast.levels, direct.levels):
        for name in ("keys", "values", "positions", "spans", "vectors"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
    # and the original chunk is still different (the splice did something)
    assert not torch.equal(lm.encode_tree(hay).levels[0].keys[c], fast.levels[0].keys[c])


def _heldout_shard(lm, path):
    end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    items = []
    for k, (task, fact, answer) in enumerate(
        [
            ("passkey", "The pass key is 4711.", "4711"),
            ("contract", "The notice period is ninety (90) days.", "ninety (90) days"),
        ]
    ):
        context = lm.tokenize(("Some filler text about nothing. " * 20) + fact + (" More filler here." * 20))
        prompt = train_eval.chat_prompt(lm, "What does the document say?")
        items.append(
            {
                "context_ids": context,
                "prompt_ids": prompt,
                "target_ids": lm.tokenize(answer) + [end],
                "task": task,
                "meta": {"item": k},
            }
        )
    write_shards(items, path, vocab_size=len(lm.tokenizer))


def test_tiny_train_eval_writes_every_table(tmp_path, model_data_dir, tiny_model):
    _heldout_shard(tiny_model, tmp_path / "heldout")
    out = tmp_path / "docs" / "training.md"
    rc = train_eval.main(
        [
            "--tiny",
            "--weights",
            "unused",
            "--data-dir",
            str(model_data_dir),
            "--heldout",
            str(tmp_path / "heldout"),
            "--needle-lengths",
            "128,256",
            "--depths",
            "0.2,0.8",
            "--ppl-lengths",
            "128",
            "--skip",
            "real_qa",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = out.read_text()
    assert "<!-- bench:train-eval:start -->" in text and "<!-- bench:train-eval:end -->" in text
    for title in ("needle (magic number)", "held-out items", "perplexity of a 256-token continuation"):
        assert title in text, title
    raw = json.loads((tmp_path / "docs" / "train-eval.json").read_text())["raw"]
    assert {r["variant"] for r in raw["needle"]} == {"trained", "copy", "zero"}
    assert len(raw["needle"]) == 2 * 2 * 3
    assert {r["variant"] for r in raw["heldout"]} == {"trained", "copy", "zero", "full"}
    assert {r["task"] for r in raw["heldout"]} == {"passkey", "contract"}
    # the memory ablation: zero init ignores the document exactly, so own == another item's
    [ablation] = raw["ablation"]
    assert ablation["zero_own"] == ablation["zero_other"] and ablation["trained_own"] > 0
    # zero init equals the base model exactly, so its perplexity equals the no-context one
    ppl = {r["context"]: r["ppl"] for r in raw["perplexity"]}
    assert ppl["sharedllm zero (memory)"] == ppl["none"]
    assert (tmp_path / "docs" / "img" / "train-eval-needle.png").is_file()
