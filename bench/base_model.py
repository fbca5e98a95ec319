"""`base`: the layer every engine stands on, for the bundled models side by side in one run.

- reading: real-PDF questions (bench/data/real_qa.jsonl) with a window of ~1.5K tokens around the
  evidence in the prompt, in two layouts: the documents inside the first user message (what `full`
  and `rag` use) and the document as plain text before the chat template. This isolates whether a
  model can read at all, before any long-context method is involved;
- our decoder against transformers' `generate` on the same weights and prompt: TTFT, decode tokens/s,
  greedy agreement (model_bench.ours_vs_hf);
- `full`'s persisted prompt cache through the app's QA service: TTFT of a first question (prefills the
  document and stores its K/V), of a follow-up with the cache, and of the same follow-up without it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from bench.common import text_of_tokens, write_pdf
from bench.report import Table, ratio
from bench.run import Run

log = logging.getLogger(__name__)

WINDOW_CHARS = 3000  # either side of the evidence: ~1.5K tokens of context in all
READING_NEW_TOKENS = 48  # instruct models restate the question before the answer
LAYOUTS = ("documents in the user message", "document before the chat template")


def reading_items(n: int) -> list[tuple[Any, str]]:
    """(item, context) pairs spread over the available PDFs: the evidence page with its neighbours,
    cut to WINDOW_CHARS either side of the evidence."""
    from bench.evalset import load_real_qa, normalise_ws, page_texts

    items = load_real_qa()
    by_pdf: dict[str, list] = {}
    for item in items:
        by_pdf.setdefault(item.pdf, []).append(item)
    out = []
    pdfs = sorted(by_pdf)
    while len(out) < n and any(by_pdf.values()):
        for pdf in pdfs:
            if not by_pdf[pdf] or len(out) >= n:
                continue
            item = by_pdf[pdf].pop(len(by_pdf[pdf]) // 2)  # middle items first: away from title pages
            pages = page_texts(pdf)
            if pages is None:
                by_pdf[pdf] = []
                continue
            text = normalise_ws(" ".join(pages[max(0, item.page - 2): item.page + 1]))
            pos = text.find(item.evidence)
            if pos < 0:
                continue
            lo = max(0, pos - WINDOW_CHARS)
            hi = min(len(text), pos + len(item.evidence) + WINDOW_CHARS)
            out.append((item, text[lo:hi]))
    return out


def _prompt(lm: Any, layout: str, context: str, question: str) -> list[int]:
    from app.services.prompt_layout import SYSTEM_PROMPT, with_documents_first

    if layout == LAYOUTS[0]:
        return lm.prompt_ids(with_documents_first(f"Document:\n{context}", question, []))[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Question: {question}"}]
    return lm.tokenize(context + "\n\n") + lm.chat_ids(messages)


def reading(lm: Any, items: list[tuple[Any, str]], max_new_tokens: int) -> list[dict]:
    from bench.evalset import contains_match
    from model import GenerationSettings

    rows = []
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    for item, context in items:
        for layout in LAYOUTS:
            ids = _prompt(lm, layout, context, item.question)
            stream = lm.generate([], settings=settings, prompt_ids=ids)
            answer = "".join(stream)
            rows.append({"model": lm.name, "id": item.id, "layout": layout, "prompt_tokens": len(ids),
                         "correct": bool(contains_match(answer, item.answers)), "answer": answer,
                         "gold": item.answers, "ttft_s": stream.result.ttft_s,
                         "tokens_per_s": stream.result.tokens_per_s})
            log.info("reading %s %s [%s]: %s", lm.name, item.id, layout, rows[-1]["correct"])
    return rows


def prompt_cache(run: Run, lengths: list[int]) -> list[dict]:
    """TTFT of `full` on a first question, a cached follow-up and the same follow-up uncached."""
    from app.services.qa import AnswerSettings, QAService
    from bench.evalset import contains_match, make_needle_item

    lm = run.lm
    out = []
    settings = AnswerSettings(max_new_tokens=run.max_new_tokens)
    from app.config import Settings
    from app.services.context import AppContext

    with run.scratch() as tmp:
        # a server whose engine is not `full` does not prefill full's prompt at ingestion, so the first
        # question below is the one that computes and stores it
        ctx = AppContext(Settings(data_dir=Path(tmp), engine="rag"), model=lm)
        try:
            owner = ctx.auth.local_user().id
            for n in lengths:
                first_item = make_needle_item(text_of_tokens(lm, n, seed=n), 0.3, seed=n, kind="magic_number")
                text = first_item.context
                second = make_needle_item(text, 0.8, seed=n + 1, kind="magic_number")
                info = ctx.ingestion.ingest_path(owner, write_pdf(second.context, Path(tmp) / f"doc-{n}.pdf"))
                first = ctx.qa.answer_all(owner, first_item.question, [info["id"]], None, "full", settings)
                cached = ctx.qa.answer_all(owner, second.question, [], first.conversation, "full", settings)
                uncached_qa = QAService(ctx.sessions, ctx.documents, ctx.model, prompt_cache=None)
                uncached = uncached_qa.answer_all(owner, second.question, [], first.conversation, "full", settings)
                out.append({
                    "target_tokens": n, "document_tokens": int(info["tokens"]),
                    "prompt_tokens": cached.timings["prompt_tokens"],
                    "cached_prompt_tokens": cached.timings["cached_prompt_tokens"],
                    "first_ttft_s": first.timings["ttft_s"], "first_total_s": first.timings["total_s"],
                    "cached_ttft_s": cached.timings["ttft_s"], "uncached_ttft_s": uncached.timings["ttft_s"],
                    "same_answer": cached.answer == uncached.answer,
                    "first_correct": bool(contains_match(first.answer, first_item.answer)),
                    "follow_up_correct": bool(contains_match(cached.answer, second.answer)),
                })
                log.info("prompt cache %d tokens: first %.1f s, cached follow-up %.2f s, uncached %.1f s", n,
                         first.timings["ttft_s"], cached.timings["ttft_s"], uncached.timings["ttft_s"])
                ctx.documents.delete(owner, info["id"])
        finally:
            ctx.close()
    return out


def _median_prompt(rows: list[dict], model: str) -> int | None:
    lengths = sorted(r["prompt_tokens"] for r in rows if r["model"] == model)
    return lengths[len(lengths) // 2] if lengths else None


def _acc(rows: list[dict]) -> str:
    return f"{sum(r['correct'] for r in rows)}/{len(rows)}" if rows else "-"


def run_base(run: Run, models: list[str], reading_n: int, cache_lengths: list[int], data_dir: Path):
    from bench.model_bench import ours_vs_hf
    from model import load_model

    started = time.perf_counter()
    section = run.section("base", "Base layer: reading, decoder vs transformers, full's prompt cache (bundled models)")
    items = reading_items(reading_n)
    raw: dict = {"reading": [], "decoder": [], "prompt_cache": []}
    for name in models:
        lm = load_model(name, data_dir=data_dir, device=str(run.lm.device), weights=False)
        model_run = dataclasses.replace(run, lm=lm)
        raw["reading"] += reading(lm, items, max(run.max_new_tokens, READING_NEW_TOKENS))
        section.raw = raw
        raw["decoder"].append({"model": lm.name, **ours_vs_hf(model_run, 1024, data_dir, name)})
        if name == models[0] and cache_lengths:
            raw["prompt_cache"] = prompt_cache(model_run, cache_lengths)
        section.raw = raw
        del lm, model_run
    names = list(dict.fromkeys(r["model"] for r in raw["reading"]))
    if names:
        section.tables.append(Table(
            ["model", *LAYOUTS, "median prompt tokens"],
            [[m, *(_acc([r for r in raw["reading"] if r["model"] == m and r["layout"] == lay]) for lay in LAYOUTS),
              _median_prompt(raw["reading"], m)] for m in names],
            title=f"reading: {len(items)} real-PDF questions, ~1.5K tokens around the evidence in the prompt "
                  f"(contains-match, greedy, {max(run.max_new_tokens, READING_NEW_TOKENS)} new tokens)"))
    section.tables.append(Table(
        ["model", "decoder", "prompt tokens", "TTFT s (median)", "decode tok/s (median)", "greedy tokens agree"],
        [row for d in raw["decoder"] for row in (
            [d["model"], f"ours ({d['attention']})", d["prompt_tokens"], d["ours"]["ttft_s"],
             d["ours"]["tokens_per_s"], f"{d['greedy_tokens_agree']} ({d['compared_tokens']})"],
            [d["model"], "transformers generate", d["prompt_tokens"], d["hf"]["ttft_s"], d["hf"]["tokens_per_s"], ""],
            [d["model"], "ratio ours / transformers", "", ratio(d["ours"]["ttft_s"], d["hf"]["ttft_s"]),
             ratio(d["ours"]["tokens_per_s"], d["hf"]["tokens_per_s"]), ""])],
        title="our decoder vs transformers' generate, same weights and prompt, greedy, no memory"))
    if raw["prompt_cache"]:
        section.tables.append(Table(
            ["document tokens", "follow-up prompt tokens", "from cache", "first question TTFT s",
             "follow-up TTFT s, cached", "follow-up TTFT s, uncached", "speed-up", "same answer"],
            [[p["document_tokens"], p["prompt_tokens"], p["cached_prompt_tokens"], p["first_ttft_s"],
              p["cached_ttft_s"], p["uncached_ttft_s"], ratio(p["uncached_ttft_s"], p["cached_ttft_s"]),
              p["same_answer"]] for p in raw["prompt_cache"]],
            title=f"`full` with its persisted prompt cache ({models[0]}), through QAService"))
    section.notes += [
        "Reading contexts are the evidence page and its neighbours, whitespace-normalised, cut to 3,000 "
        "characters either side of the evidence span; the same items and contexts for every model.",
        "Prompt-cache rows: the first question prefills the whole document and stores its K/V after answering; "
        "the follow-up reads them from the tensor store (memory-mapped, sha256-verified) and prefills only the "
        "rest; the uncached row is the same follow-up through a QAService without the cache.",
    ]
    return run.write(section, started)
