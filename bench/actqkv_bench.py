"""`actqkv` / `homer`: the training-free engines against `full` (with its prompt cache) and `rag` on
the same documents in one run, from 4K to 128K tokens of real text.

Per length, one haystack (Python's documentation) holds one needle per depth (a "special magic
number" for a different noun at each depth), each asked separately, so every engine answers the same
questions about the same document. Measured on that document: ActQKV's encoding tokens/s and stored
bytes per token; per question and engine the answer, TTFT (from a persisted state: ActQKV's block
K/V, `full`'s prompt prefix, both computed once per document and timed separately) and decode
tokens/s. `full` reads at most its window (head and tail of longer documents); `rag` its top chunks.
HOMER (`homer` in the engines): its leaves are encoded once per document (timed), its calibration
once per run (timed); per question the merge from the stored leaves is timed against recomputing
the leaves too (what persisting them saves), and every answer's peak RSS (peak GPU memory on CUDA)
is recorded against document length (HOMER's depth-first merge keeps it logarithmic).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.common import document_context, peak_memory, split_pages, text_of_tokens
from bench.report import Table, plot_lines
from bench.run import Run

log = logging.getLogger(__name__)

REPLICATE_SEED_STEP = 100_003  # far apart from every length's seeds: replicates never share a haystack


def needle_document(lm, n_tokens: int, depths: list[float], replicate: int = 0):
    """A real-text haystack of about n_tokens with one magic-number needle per depth, each for another
    noun (so every question has exactly one right answer in the document). `replicate` r > 0 draws
    another haystack order and other needles for the same length and depths (r = 0: the documents
    every earlier run measured), so a grid cell can hold more than one sample."""
    from bench.evalset import make_needle_item

    shift = replicate * REPLICATE_SEED_STEP
    text = text_of_tokens(lm, n_tokens, seed=500 + n_tokens + shift)
    items, nouns = [], set()
    for depth in sorted(depths, reverse=True):  # deepest first: the shallower offsets stay where asked
        seed = n_tokens + int(depth * 100) + shift
        while True:
            item = make_needle_item(text, depth, seed=seed, kind="magic_number")
            noun = item.question.split(" for ", 1)[1].split(" ", 1)[0]
            if noun not in nouns:
                break
            seed += 1
        nouns.add(noun)
        text = item.context
        items.append(item)
    return text, sorted(items, key=lambda it: it.depth)


def _prefix_cache(lm, prepared):
    """`full`'s persisted prompt prefix for this document (what the app stores at ingestion)."""
    from model.generate import PrefixState

    ids, cut = lm.prompt_ids(prepared.messages, prepared.cache_prefix)
    cache = lm.prefix_states(ids[:cut])
    k, v = zip(*(layer.prefix(cut) for layer in cache), strict=True)
    return PrefixState(list(k), list(v)), ids


def answer(lm, engine, question: str, doc, max_new_tokens: int, full_prefix=None) -> dict:
    from model import GenerationSettings

    with peak_memory() as memory:
        t0 = time.perf_counter()
        prepared = engine.prepare(lm, question, [doc], [])
        prepare_s = time.perf_counter() - t0
        prompt_ids, prefix = prepared.prompt_ids, prepared.prefix
        if engine.name == "full" and full_prefix is not None:
            prefix = full_prefix
            prompt_ids, _ = lm.prompt_ids(prepared.messages, prepared.cache_prefix)
        stream = lm.generate(prepared.messages, prepared.memory, GenerationSettings(max_new_tokens=max_new_tokens),
                             retrieval_s=prepared.retrieval_s, prompt_ids=prompt_ids, prefix=prefix)
        pieces, ttft = [], None
        for piece in stream:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            pieces.append(piece)
    result = stream.result
    return {"answer": "".join(pieces), "ttft_s": ttft if ttft is not None else time.perf_counter() - t0,
            "prepare_s": prepare_s, "decode_tps": result.tokens_per_s, "new_tokens": result.new_tokens,
            "prompt_tokens": len(prompt_ids) if prompt_ids else result.prompt_tokens,
            "peak_rss_mb": memory["peak_rss_mb"], "rss_before_mb": memory["rss_before_mb"],
            **({"peak_gpu_mb": memory["peak_gpu_mb"]} if "peak_gpu_mb" in memory else {}),
            **{k: v for k, v in prepared.notes.items() if k.startswith("homer_")}}


def tile_state(state, n_tokens: int):
    """A state of `n_tokens` made by repeating `state`'s blocks (timing only: retrieval, gathers and
    attention cost the same whatever the text, so TTFT against length needs no hour of encoding)."""
    from model.block_kv import StoredKV
    from model.block_state import BlockState

    B = state.config.block_size
    whole = state.length // B * B
    reps = -(-n_tokens // whole)

    def tile(kv):
        data = kv.data[:, :whole].repeat(1, reps, 1)[:, :n_tokens]
        scale = None if kv.scale is None else kv.scale[:, : whole // B].repeat(1, reps)[:, : -(-n_tokens // B)]
        return StoredKV(data.contiguous(), scale, kv.block_size)

    n_blocks = -(-n_tokens // B)
    return BlockState(state.config, (state.token_ids[:whole] * reps)[:n_tokens], state.doc_offset,
                      [tile(k) for k in state.k], [tile(v) for v in state.v],
                      [r[: whole // B].repeat(reps, 1, 1)[:n_blocks].contiguous() for r in state.reprs],
                      state.stats, state.entropy)


LATER_QUESTIONS = 3  # later questions per tiled length; their median is reported


def ttft_vs_length(run: Run, state, lengths: list[int], question: str) -> list[dict]:
    """TTFT and decode speed of questions on states of each length, stored and memory-mapped from a
    tensor store as the app reads them (the page cache is warm: the file was just written). The first
    question of a process hashes the file (sha256 against the recorded digest); later ones find it
    verified (storage.TensorStore) and only map it: both are timed, the ratio is the later ones' (the
    median of `LATER_QUESTIONS`: on a shared CPU one question's time moves by +-30 %)."""
    from storage import TensorStore

    rows = []
    with run.scratch() as tmp:
        store = TensorStore(Path(tmp))
        for n in lengths:
            saved = store.save(1, f"tiled-{n}", tile_state(state, n).to_tensors())
            time.sleep(store.SETTLED_S + 0.1)  # as a file ingested before the question: settled, so remembered
            first = _tiled_question(run, store, saved, state, n, question)
            later = sorted((_tiled_question(run, store, saved, state, n, question) for _ in range(LATER_QUESTIONS)),
                           key=lambda r: r["ttft_s"])
            median = later[len(later) // 2]
            rows.append({"tokens": n, "bytes": saved.bytes, "first_load_s": first["load_s"],
                         "first_ttft_s": first["ttft_s"], "load_s": median["load_s"], "ttft_s": median["ttft_s"],
                         "ttft_all_s": [r["ttft_s"] for r in later], "decode_tps": median["decode_tps"]})
            log.info("actqkv tiled %d tokens: TTFT %.2f s, median of %s (load %.2f s; first question %.2f s, "
                     "load %.2f s)", n, median["ttft_s"], [round(r["ttft_s"], 2) for r in later], median["load_s"],
                     first["ttft_s"], first["load_s"])
            store.delete(saved.path)
    return rows


def _tiled_question(run: Run, store, saved, state, n: int, question: str) -> dict:
    from app.services.documents import DocumentContext, PageSpan
    from app.services.engines import ActQKVEngine
    from model.block_state import BlockState

    t0 = time.perf_counter()
    loaded = BlockState.from_tensors(store.load(saved.path, saved.sha256), state.config)
    load_s = time.perf_counter() - t0
    doc = DocumentContext(1, "tiled", [PageSpan(1, 0, n - state.doc_offset, "")], [])
    doc.extra["actqkv"] = loaded
    out = answer(run.lm, ActQKVEngine(), question, doc, run.max_new_tokens)
    return {"load_s": load_s, "ttft_s": out["ttft_s"] + load_s, "decode_tps": out["decode_tps"]}


def _of(row: dict, stats: dict) -> bool:
    """Whether a question's row belongs to the document of `stats` (its length and its depths)."""
    return row["length"] == stats["length"] and row["depth"] in stats.get("depths", [row["depth"]])


def _acc(rows: list[dict]) -> float | None:
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def run_actqkv(run: Run, lengths: list[int], depths: list[float], engines: tuple[str, ...],
               tiled_lengths: list[int] | None = None, key: str = "actqkv", single_needle: bool = False,
               replicates: list[int] | None = None):
    """The grid: per length one document holding a needle per depth (each question has the other
    needles as distractors), or with `single_needle` one document per depth holding its needle alone
    (the classic needle in a haystack: what the engine finds, apart from telling needles apart).
    `replicates` (default [0]): which draws of the documents (`needle_document`); several give each
    (length, depth) cell several samples, and the tables then add accuracy per depth."""
    from app.services.engines import get_engine
    from app.services.prompt_layout import document_stream, homer_stream
    from bench.evalset import contains_match

    started = time.perf_counter()
    titles = {"actqkv": "ActQKV: needle grid and speed against document length (one run)",
              "homer": "HOMER beside the other engines: needle grid, speed and peak memory against document "
                       "length (one run)"}
    section = run.section(key, titles[key])
    lm, rows, speed = run.lm, [], []
    calibration_s = None
    if "homer" in engines:
        t0 = time.perf_counter()
        lm.homer_bias = lm.calibrate_homer()
        calibration_s = time.perf_counter() - t0
        log.info("homer: calibration in %.0f s", calibration_s)
    replicates = replicates or [0]
    grid = [(n, r, d) for n in lengths for r in replicates
            for d in ([[x] for x in depths] if single_needle else [depths])]
    for n, replicate, doc_depths in grid:
        text, items = needle_document(lm, n, doc_depths, replicate)
        doc, _ = document_context(lm, split_pages(text), "haystack", with_tree=False)
        tokens = len(doc.token_ids)
        stats = {"length": n, "tokens": tokens, "depths": list(doc_depths), "replicate": replicate}
        if "actqkv" in engines:
            t0 = time.perf_counter()
            state = lm.encode_blocks(*document_stream(lm, doc))
            stats["encode_s"] = time.perf_counter() - t0
            stats["encode_tps"] = state.length / stats["encode_s"]
            stats["bytes_per_token"] = state.nbytes() / state.length
            doc.extra["actqkv"] = state
            log.info("actqkv: %d tokens encoded in %.0f s (%.0f tokens/s)", tokens, stats["encode_s"], stats["encode_tps"])
        if "homer" in engines:
            t0 = time.perf_counter()
            state = lm.encode_homer(*homer_stream(lm, doc))
            stats["homer_encode_s"] = time.perf_counter() - t0
            stats["homer_encode_tps"] = len(state.token_ids) / stats["homer_encode_s"]
            stats["homer_bytes_per_token"] = state.nbytes() / len(state.token_ids)
            stats["homer_pieces"] = len(state.ranges)
            doc.extra["homer"] = state
            log.info("homer: %d tokens in %d leaves encoded in %.0f s", tokens, len(state.ranges), stats["homer_encode_s"])
        full_prefix = None
        if "full" in engines:
            t0 = time.perf_counter()
            full_prefix, _ = _prefix_cache(lm, get_engine("full").prepare(lm, items[0].question, [doc], []))
            stats["full_prefix_s"] = time.perf_counter() - t0
            stats["full_prefix_tokens"] = full_prefix.length
        speed.append(stats)
        for item in items:
            for name in engines:
                out = answer(lm, get_engine(name), item.question, doc, run.max_new_tokens, full_prefix)
                ok = bool(contains_match(out["answer"], item.answer))
                rows.append({"length": n, "tokens": tokens, "depth": item.depth, "replicate": replicate,
                             "engine": name, "correct": ok, "gold": item.answer, **out})
                log.info("needle %d depth %.1f %s: %s (%r)", n, item.depth, name, ok, out["answer"][:60])
        section.raw = {"needle": rows, "speed": speed}
        section.tables = _grid_tables(rows, speed, lengths, depths, engines, single_needle, calibration_s)
        run.write(section, started)  # partial results survive a long run being stopped
    section.tables = _grid_tables(rows, speed, lengths, depths, engines, single_needle, calibration_s)
    if tiled_lengths and "actqkv" in engines:
        text, items = needle_document(lm, min(tiled_lengths), depths[:1])  # the tiles' base: the shortest tiled length
        doc, _ = document_context(lm, split_pages(text), "haystack", with_tree=False)
        tiled = ttft_vs_length(run, lm.encode_blocks(*document_stream(lm, doc)), tiled_lengths, items[0].question)
        section.raw["tiled"] = tiled
        base_ttft = tiled[0]["ttft_s"]
        section.tables.append(Table(
            ["state tokens", "stored MB", "first question: load s (sha256 + mmap)", "first question: TTFT s",
             "load s (mmap)", "TTFT s (median)", "later questions' TTFT s", "TTFT / shortest", "decode tok/s"],
            [[r["tokens"], r["bytes"] / 2**20, r["first_load_s"], r["first_ttft_s"], r["load_s"], r["ttft_s"],
              " ".join(f"{x:.2f}" for x in r["ttft_all_s"]), r["ttft_s"] / base_ttft, r["decode_tps"]] for r in tiled],
            title=f"actqkv TTFT against document length: a real {min(tiled_lengths)}-token state tiled to each length "
                  "(timing only), saved and memory-mapped as the app reads it; the first question of a process "
                  "verifies the file's sha256, later ones find it verified (TTFT and ratio: their median)"))
    xs = lengths
    for name, title, ylabel, field in (("needle", "needle accuracy vs document length", "accuracy", "correct"),
                                       ("ttft", "TTFT vs document length (persisted state)", "seconds", "ttft_s"),
                                       ("memory", "peak RSS while answering vs document length", "MB", "peak_rss_mb")):
        series = {e: (xs, [_mean([float(r[field]) for r in rows if r["length"] == n and r["engine"] == e]) for n in xs])
                  for e in engines}
        path = plot_lines(run.figure(f"{key}-{name}"), title, "document tokens", ylabel, series, run.machine,
                          run.command, section.weights, logx=True)
        section.figures.append(run.rel(path))
    settings = {e: getattr(lm, e).to_dict() if e == "actqkv" else lm.homer_config().to_dict()
                for e in engines if e in ("actqkv", "homer")}
    section.notes.append(f"settings: {settings}; greedy answers of at most {run.max_new_tokens} tokens; "
                         f"`full` reads head + tail when the document exceeds its window.")
    section.raw = {"needle": rows, "speed": speed, **({"tiled": section.raw["tiled"]} if "tiled" in section.raw else {})}
    return run.write(section, started)


def _grid_tables(rows: list[dict], speed: list[dict], lengths: list[int], depths: list[float],
                 engines: tuple[str, ...], single_needle: bool, calibration_s: float | None) -> list:
    """The needle, speed and memory tables (and HOMER's merge table) of the documents done so far."""
    done = [n for n in lengths if any(r["length"] == n for r in rows)]
    replicates = sorted({r.get("replicate", 0) for r in rows})

    def marks(n: int, e: str) -> str:  # per replicate, in depth order; replicates apart by " | "
        return " | ".join(" ".join("✓" if r["correct"] else "✗" for r in rows
                                   if r["length"] == n and r["engine"] == e and r.get("replicate", 0) == rep)
                          for rep in replicates if any(r["length"] == n and r.get("replicate", 0) == rep for r in rows))

    tables = [
        Table(["length", "doc tokens", *(f"{e} @ depths {','.join(map(str, depths))}" for e in engines),
               *(f"{e} acc" for e in engines)],
              [[n, next((r["tokens"] for r in rows if r["length"] == n), None),
                *(marks(n, e) for e in engines),
                *(_acc([r for r in rows if r["length"] == n and r["engine"] == e]) for e in engines)]
               for n in done],
              title="needle in a real-text haystack, " + ("one document per depth, its needle alone"
                     if single_needle else "one needle per depth, each asked separately") + " (contains-match)"
                    + (f"; replicates {','.join(map(str, replicates))} apart by |" if len(replicates) > 1 else "")),
        Table(["length", "doc tokens", "actqkv encode tokens/s", "actqkv bytes/token", "full prefix s (tokens)",
               *(f"{e} TTFT s" for e in engines), *(f"{e} decode tok/s" for e in engines)],
              [[s["length"], s["tokens"], s.get("encode_tps"), s.get("bytes_per_token"),
                f"{s['full_prefix_s']:.0f} ({s['full_prefix_tokens']})" if "full_prefix_s" in s else None,
                *(_mean([r["ttft_s"] for r in rows if _of(r, s) and r["engine"] == e]) for e in engines),
                *(_mean([r["decode_tps"] for r in rows if _of(r, s) and r["engine"] == e])
                  for e in engines)]
               for s in speed],
              title="speed: encoding once per document, then per question from the persisted state"),
        Table(["length", "doc tokens", *(f"{e} peak RSS MB" for e in engines)],
              [[s["length"], s["tokens"],
                *(_mean([r["peak_rss_mb"] for r in rows if _of(r, s) and r["engine"] == e])
                  for e in engines)] for s in speed],
              title="peak resident memory of the process while answering (mean over the questions; the model's "
                    "weights and the loaded state included)"),
    ]
    if len(replicates) > 1:
        cells = [(n, d) for n in done for d in depths if any(r["length"] == n and r["depth"] == d for r in rows)]
        tables.insert(1, Table(
            ["length", "depth", *(f"{e} right / samples" for e in engines)],
            [[n, d, *(f"{sum(r['correct'] for r in cell)}/{len(cell)}" for cell in
                      ([r for r in rows if r["length"] == n and r["depth"] == d and r["engine"] == e]
                       for e in engines))] for n, d in cells],
            title=f"needle accuracy per cell over replicates {','.join(map(str, replicates))}"))
    if "homer" in engines:
        tables.append(Table(
            ["length", "doc tokens", "leaves", "encode tokens/s", "stored bytes/token", "merge s (stored leaves)",
             "merge s recomputing the leaves", "saved", "cache tokens", "peak GPU MB"],
            [[s["length"], s["tokens"], s["homer_pieces"], s["homer_encode_tps"], s["homer_bytes_per_token"],
              merge := _mean([r["prepare_s"] for r in rows if _of(r, s) and r["engine"] == "homer"]),
              s["homer_encode_s"] + merge if merge is not None else None,
              1 - merge / (s["homer_encode_s"] + merge) if merge else None,
              _mean([r.get("homer_cache_tokens", 0) for r in rows if _of(r, s) and r["engine"] == "homer"]),
              _mean([r["peak_gpu_mb"] for r in rows if _of(r, s) and r["engine"] == "homer"
                     and "peak_gpu_mb" in r])]
             for s in speed],
            title="homer per question: the merge from the stored leaves against recomputing them as well "
                  f"(calibration once per model: {calibration_s:.0f} s)"))
    return tables


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
