"""`ingest`: a real ~100-page PDF through the app's IngestionService, time split extract / tokenize /
encode / write (+ the rest: hashing the upload, database rows), bytes on disk per document token;
then one question per engine on it, which is the whole product path on a long real document."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.common import app_context, peak_memory, stored_bytes, timed_ingestion
from bench.report import Table, ratio
from bench.run import Run

log = logging.getLogger(__name__)

DEFAULT_PDF = "nettle-manual"
DEFAULT_QA_ID = None  # the first item of the PDF whose evidence lies furthest into it


def pick_question(pdf_id: str):
    from bench.evalset import evidence_offset, load_real_qa

    items = [i for i in load_real_qa() if i.pdf == pdf_id]
    return max(items, key=lambda i: evidence_offset(i) or 0) if items else None


def run_ingest(run: Run, pdf_id: str = DEFAULT_PDF, engines: tuple[str, ...] = ("sharedllm", "full", "rag"),
               ask: bool = True):
    from app.services.qa import AnswerSettings
    from bench.evalset import contains_match, evidence_token_offset, load_real_pdfs, pdf_path

    started = time.perf_counter()
    pdf = load_real_pdfs()[pdf_id]
    path = pdf_path(pdf_id)
    if path is None:
        raise RuntimeError(f"PDF {pdf_id} is not available")
    section = run.section("ingest", f"Ingestion of a real PDF: {pdf.title} ({pdf.pages} pages)")
    with run.store() as tmp:
        ctx = app_context(Path(tmp), run.lm)
        try:
            owner = ctx.auth.local_user()
            with timed_ingestion(ctx) as stages, peak_memory() as mem:
                t0 = time.perf_counter()
                info = ctx.ingestion.ingest_path(owner.id, path)
                total = time.perf_counter() - t0
            if info["status"] != "ready":
                raise RuntimeError(f"ingestion of {pdf_id} ended {info['status']}: {info.get('error')}")
            tokens = int(info["tokens"])
            sizes = stored_bytes(ctx, info["id"])
            s = dict(stages.seconds)
            other = total - sum(s.values())
            rows = [[stage, s.get(stage, 0.0), 100 * s.get(stage, 0.0) / total,
                     tokens / s[stage] if s.get(stage) else None]
                    for stage in ("extract", "tokenize", "encode", "write", "prompt")]
            rows.append(["other (upload hash, DB rows)", other, 100 * other / total, None])
            rows.append(["**total**", total, 100.0, tokens / total])
            section.tables.append(Table(["stage", "seconds", "% of total", "tokens/s"], rows,
                                        title=f"{pdf.pages} pages, {tokens:,} tokens"))
            section.tables.append(Table(
                ["stored", "bytes", "bytes per document token"],
                [["context tree (safetensors, incl. token ids)", sizes["tree_bytes"], sizes["tree_bytes"] / tokens],
                 ["full's prompt cache (K/V of the document prefix, model dtype)", sizes["prompt_cache_bytes"],
                  sizes["prompt_cache_bytes"] / tokens],
                 ["text rows (pages + chunks, SQLite)", sizes["text_bytes"], sizes["text_bytes"] / tokens]],
            ))
            raw = {"pdf": pdf_id, "pages": pdf.pages, "tokens": tokens, "total_s": total, "stages_s": s,
                   "other_s": other, **sizes, "peak_rss_mb": mem["peak_rss_mb"],
                   "extract_child_peak_rss_mb": stages.extract_child_peak_rss_mb}
            section.notes.append(
                f"peak RSS of the ingesting process {mem['peak_rss_mb']:.0f} MB (model included); "
                f"extraction child {stages.extract_child_peak_rss_mb:.0f} MB")
            if ask:
                item = pick_question(pdf_id)
                raw["question"] = item.id
                depth = evidence_token_offset(item, run.lm.tokenizer)
                settings = AnswerSettings(max_new_tokens=run.max_new_tokens)
                ctx.documents.load_for_qa(owner.id, [info["id"]], run.lm.fingerprint)  # tree load, once
                qrows, answers = [], {}
                for engine in engines:
                    with peak_memory() as qmem:
                        ans = ctx.qa.answer_all(owner.id, item.question, [info["id"]], None, engine, settings)
                    t = ans.timings
                    answers[engine] = {"answer": ans.answer, **t, "peak_rss_mb": qmem["peak_rss_mb"],
                                       "correct": contains_match(ans.answer, item.answers)}
                    qrows.append([engine, t["ttft_s"], t["tokens_per_s"], t["total_s"], qmem["peak_rss_mb"],
                                  int(answers[engine]["correct"]), ans.answer[:80].replace("\n", " ")])
                for row in qrows:
                    if row[0] != "sharedllm" and "sharedllm" in answers:
                        section.notes.append(
                            f"TTFT sharedllm / {row[0]} = {ratio(answers['sharedllm']['ttft_s'], row[1]):.3f} "
                            f"({row[0]} takes {ratio(row[1], answers['sharedllm']['ttft_s']):.1f}x as long)")
                section.tables.append(Table(
                    ["engine", "TTFT s", "decode tok/s", "end-to-end s", "peak RSS MB", "correct", "answer"], qrows,
                    title=f"whole path on this document: question {item.id} (evidence at token {depth:,}); "
                          f"gold {item.answers}; {run.max_new_tokens} new tokens max"))
                raw["answers"] = answers
                section.notes.append(
                    f"whole path (ingest + one sharedllm question) on this {tokens:,}-token real document: "
                    f"{total + answers.get('sharedllm', {}).get('total_s', 0.0):.0f} s")
            section.raw = raw
        finally:
            ctx.close()
    section.notes.append("`full` sees at most its 8K window (head and tail kept); `rag` reads the top-4 BM25 chunks.")
    return run.write(section, started)
