"""`speed`: the three engines on identical inputs through the app's own services.

For each document length: real text (Python's documentation) with one needle fact at depth 0.5 is
written as a PDF and ingested by IngestionService (timed by stage); then each engine answers the same
question(s) through QAService. Per engine: ingestion tokens/s (what the engine needs: baselines need
no tree, so their ingestion excludes encode + write), TTFT, decode tokens/s, end-to-end seconds per
question, peak RSS of the process while answering, bytes on disk per document token (tree for
sharedllm, text rows for the baselines). Ratios sharedllm / baseline are taken pair by pair.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from bench.common import app_context, peak_memory, stored_bytes, text_of_tokens, timed_ingestion, write_pdf
from bench.report import Table, plot_lines, ratio
from bench.run import Run

log = logging.getLogger(__name__)


def _kilo(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def measure_length(run: Run, ctx, owner_id: int, n_tokens: int, engines: tuple[str, ...], questions: int,
                   tmp: Path) -> dict:
    from app.services.qa import AnswerSettings
    from bench.evalset import contains_match, make_needle_item

    lm = run.lm
    haystack = text_of_tokens(lm, n_tokens, seed=n_tokens)
    items = [make_needle_item(haystack, 0.5, seed=n_tokens + q, kind="magic_number") for q in range(questions)]
    # one document holds every question's needle (at depth 0.5 and a little after each other)
    text = items[0].context
    for item in items[1:]:
        pos = items[0].char_offset + len(items[0].needle) + 1
        text = text[:pos] + item.needle + " " + text[pos:]
    pdf = write_pdf(text, tmp / f"doc-{n_tokens}.pdf")
    with timed_ingestion(ctx) as stages, peak_memory() as ingest_mem:
        t0 = time.perf_counter()
        info = ctx.ingestion.ingest_path(owner_id, pdf)
        ingest_s = time.perf_counter() - t0
    if info["status"] != "ready":
        raise RuntimeError(f"ingestion of the {n_tokens}-token document ended {info['status']}: {info.get('error')}")
    tokens = int(info["tokens"])
    s = dict(stages.seconds)
    sizes = stored_bytes(ctx, info["id"])
    t0 = time.perf_counter()
    ctx.documents.load_for_qa(owner_id, [info["id"]], lm.fingerprint)  # tree load + checksum, once per server
    tree_load_s = time.perf_counter() - t0
    out = {"target_tokens": n_tokens, "tokens": tokens, "ingest_s": ingest_s, "stages_s": s, "tree_load_s": tree_load_s,
           "ingest_peak_rss_mb": ingest_mem["peak_rss_mb"], **sizes, "engines": {}}
    settings = AnswerSettings(max_new_tokens=run.max_new_tokens)
    for engine in engines:
        per_q = []
        for item in items:
            with peak_memory() as mem:
                ans = ctx.qa.answer_all(owner_id, item.question, [info["id"]], None, engine, settings)
            per_q.append({**ans.timings, "peak_rss_mb": mem["peak_rss_mb"], "rss_before_mb": mem["rss_before_mb"],
                          "answer": ans.answer, "correct": contains_match(ans.answer, item.answer),
                          "truncated": bool(ans.notes.get("truncated", False))})
            log.info("%s tokens, %s: ttft %.2f s, total %.2f s", tokens, engine, ans.timings["ttft_s"],
                     ans.timings["total_s"])
        needs_tree = engine == "sharedllm"
        tree_s = s.get("encode", 0.0) + s.get("write", 0.0)
        prompt_s = s.get("prompt", 0.0)  # full's prompt prefix, prepared at ingestion
        ingest_engine_s = ingest_s - {"sharedllm": prompt_s, "full": tree_s}.get(engine, tree_s + prompt_s)
        out["engines"][engine] = {
            "ttft_s": statistics.median(q["ttft_s"] for q in per_q),
            "tokens_per_s": statistics.median(q["tokens_per_s"] for q in per_q),
            "total_s": statistics.median(q["total_s"] for q in per_q),
            "peak_rss_mb": max(q["peak_rss_mb"] for q in per_q),
            "ingest_tokens_per_s": tokens / ingest_engine_s if ingest_engine_s > 0 else None,
            "disk_bytes_per_token": (sizes["tree_bytes"] if needs_tree else sizes["text_bytes"]
                                     + (sizes["prompt_cache_bytes"] if engine == "full" else 0)) / tokens,
            "correct": sum(q["correct"] for q in per_q) / len(per_q),
            "questions": per_q,
        }
    ctx.documents.delete(owner_id, info["id"])  # frees the cached tree before the next length
    return out


def run_speed(run: Run, lengths: list[int], engines: tuple[str, ...], questions: int = 1):
    started = time.perf_counter()
    section = run.section("speed", "Speed and size per engine vs document length")
    results = []
    with run.scratch() as tmp:
        ctx = app_context(Path(tmp), run.lm)
        try:
            owner = ctx.auth.local_user()
            for n in lengths:
                log.info("speed: %d-token document", n)
                results.append(measure_length(run, ctx, owner.id, n, engines, questions, Path(tmp)))
                section.raw = {"lengths": results}
        finally:
            ctx.close()
    rows, ratio_rows = [], []
    for r in results:
        e = r["engines"]
        for name, m in e.items():
            rows.append([_kilo(r["target_tokens"]), r["tokens"], name, m["ingest_tokens_per_s"], m["ttft_s"],
                         m["tokens_per_s"], m["total_s"], m["peak_rss_mb"], m["disk_bytes_per_token"],
                         f"{m['correct']:.0%}" + (" (truncated)" if any(q["truncated"] for q in m["questions"]) else "")])
        if "sharedllm" in e:
            sh = e["sharedllm"]
            for base in (b for b in e if b != "sharedllm"):
                b = e[base]
                ratio_rows.append([_kilo(r["target_tokens"]), f"sharedllm / {base}", ratio(sh["ttft_s"], b["ttft_s"]),
                                   ratio(b["ttft_s"], sh["ttft_s"]), ratio(sh["total_s"], b["total_s"]),
                                   ratio(sh["tokens_per_s"], b["tokens_per_s"]), ratio(sh["peak_rss_mb"], b["peak_rss_mb"]),
                                   ratio(sh["ingest_tokens_per_s"], b["ingest_tokens_per_s"])])
    section.tables.append(Table(
        ["length", "doc tokens", "engine", "ingest tok/s", "TTFT s", "decode tok/s", "end-to-end s", "peak RSS MB",
         "disk B/token", "needle found"], rows,
        title=f"{questions} question(s) per document, {run.max_new_tokens} new tokens max, greedy"))
    section.tables.append(Table(
        ["length", "pair", "TTFT ratio", "TTFT speed-up", "end-to-end ratio", "decode tok/s ratio", "peak RSS ratio",
         "ingest tok/s ratio"], ratio_rows, title="ratios, pair by pair in this run (sharedllm / baseline)"))
    ingest_rows = [[_kilo(r["target_tokens"]), r["tokens"], r["ingest_s"], *(r["stages_s"].get(k, 0.0) for k in
                    ("extract", "tokenize", "encode", "write", "prompt")), r["tree_load_s"], r["ingest_peak_rss_mb"]]
                   for r in results]
    section.tables.append(Table(
        ["length", "doc tokens", "ingest s", "extract s", "tokenize s", "encode s", "write s", "full prompt s",
         "tree load s",
         "ingest peak RSS MB"], ingest_rows, title="ingestion (once per document)"))
    xs = [r["tokens"] for r in results]
    for metric, label, name, logy in (("ttft_s", "time to first token (s)", "speed-ttft", True),
                                      ("peak_rss_mb", "peak RSS while answering (MB)", "speed-memory", False)):
        series = {eng: (xs, [r["engines"].get(eng, {}).get(metric) for r in results]) for eng in engines}
        path = plot_lines(run.figure(name), f"{label} vs document length", "document tokens", label, series,
                          run.machine, run.command, section.weights, logx=True, logy=logy)
        section.figures.append(run.rel(path))
    section.notes += [
        ("Each question goes through QAService (database, tree from the store, engine, generation); TTFT is "
        "measured from the call to the first streamed piece, with the document's tree already loaded "
        "(`tree load s` is that one-off cost)."),
        ("`full` keeps the head and tail of the document within its 8K window, so beyond ~7.6K tokens its "
        "prompt stops growing (and the needle at depth 0.5 is cut out); `rag` puts 4 BM25 chunks of 512 "
        "tokens in the prompt."),
        ("ingest tok/s: sharedllm = tokens / (extract + tokenize + encode + write + rows); the baselines need "
        "no tree, so their figure leaves out encode + write; full's includes the prefill of its prompt prefix "
        "at ingestion (`prompt`), rag's does not. disk B/token: sharedllm = tree file; full = text rows + "
        "its prompt cache; rag = page and chunk text rows."),
        "Peak RSS includes the model (the whole process); it is reset before each question (/proc/self/clear_refs).",
    ]
    return run.write(section, started)
