"""`model`: engine-level figures, no database.

- tree encoding throughput (tokens/s) and tree bytes per token, on real text;
- query-aware search + gather time and the sharedllm TTFT / decode tokens/s with the memory, on trees
  tiled (copied along the chunk axis) to long lengths: search, gather and cross-attention cost depend
  only on the tree's shape, so tiling measures them without hours of encoding (the rows say so);
- our decoder vs transformers' `generate` on the same base model and the same prompt: TTFT, decode
  tokens/s, and whether the greedy tokens agree.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from bench.common import text_of_tokens
from bench.report import Table, plot_lines, ratio
from bench.run import Run

log = logging.getLogger(__name__)

QUESTION = "What is the special magic number for lantern mentioned in the document?"


def tile_tree(tree, n_tokens: int):
    """A tree of ~n_tokens made by repeating `tree`'s chunks (shapes and costs of a real one)."""
    from model.tree import ContextTree, TreeLevel

    reps = max(1, -(-n_tokens // (tree.n_chunks * tree.chunk_len)))
    n_chunks = max(1, n_tokens // tree.chunk_len)
    levels = [TreeLevel(**{f: getattr(lv, f).repeat(reps, *([1] * (getattr(lv, f).dim() - 1)))[:n_chunks]
                           for f in TreeLevel.FIELDS}) for lv in tree.levels]
    return ContextTree(levels=levels, n_tokens=n_chunks * tree.chunk_len, chunk_len=tree.chunk_len)


def _median_time(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def hf_model_for(lm, data_dir: Path, model_path: str | None):
    """transformers' LlamaForCausalLM with the same weights as `lm`'s base model (fp32)."""
    from transformers import AutoModelForCausalLM

    if lm.name != "tiny-random":
        from model.loading import resolve_checkpoint

        checkpoint = resolve_checkpoint(model_path, Path(data_dir))
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    from bench.gpu_speed import hf_twin

    return hf_twin(lm.model.base, torch.float32)


def ours_vs_hf(run: Run, prompt_tokens: int, data_dir: Path, model_path: str | None, repeats: int = 3) -> dict:
    """Our decoder against transformers' `generate` on the same weights and prompt (greedy): TTFT,
    decode tokens/s, token agreement. The two alternate `repeats` times and medians are reported, so
    a load burst on the shared CPU does not land on one side only."""
    from model import GenerationSettings

    lm = run.lm
    n_new = max(8, run.max_new_tokens * 2)
    doc = text_of_tokens(lm, prompt_tokens, seed=7)
    messages = [{"role": "user", "content": f"{doc}\n\nSummarise the text above in one sentence."}]
    ids = lm.chat_ids(messages)
    settings = GenerationSettings(max_new_tokens=n_new)
    hf = hf_model_for(lm, data_dir, model_path)
    input_ids = torch.tensor([ids])
    kwargs = {"do_sample": False, "pad_token_id": lm.tokenizer.eos_token_id, "eos_token_id": lm.eos_ids}
    for _ in lm.generate([], None, GenerationSettings(max_new_tokens=2), prompt_ids=ids[:64]):  # warm-up
        pass
    with torch.no_grad():
        hf.generate(input_ids[:, :64], max_new_tokens=2, **kwargs)  # warm-up, as ours got
    ours_runs, hf_runs = [], []
    for _ in range(repeats):
        stream = lm.generate(messages, None, settings)
        for _ in stream:
            pass
        ours_runs.append(stream.result)
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            hf_ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(input_ids, max_new_tokens=n_new, **kwargs)
            hf_total = time.perf_counter() - t0
        hf_tokens = [t for t in out[0, len(ids):].tolist() if t not in lm.eos_ids]
        hf_tps = (len(hf_tokens) - 1) / (hf_total - hf_ttft) if len(hf_tokens) > 1 and hf_total > hf_ttft else None
        hf_runs.append((hf_ttft, hf_tps, hf_tokens))
    ours = ours_runs[-1]
    hf_tokens = hf_runs[-1][2]
    same = min(len(hf_tokens), len(ours.token_ids))
    agree = ours.token_ids[:same] == hf_tokens[:same]
    del hf
    hf_tps_all = [r[1] for r in hf_runs if r[1] is not None]
    return {"prompt_tokens": len(ids), "new_tokens": n_new, "repeats": repeats,
            "ours": {"ttft_s": statistics.median(r.ttft_s for r in ours_runs),
                     "tokens_per_s": statistics.median(r.tokens_per_s for r in ours_runs), "tokens": ours.new_tokens},
            "hf": {"ttft_s": statistics.median(r[0] for r in hf_runs),
                   "tokens_per_s": statistics.median(hf_tps_all) if hf_tps_all else None, "tokens": len(hf_tokens)},
            "greedy_tokens_agree": agree, "compared_tokens": same,
            "attention": lm.model.base.attention_backend}


def encode_and_search(run: Run, n_tokens: int, tiled: list[int]) -> tuple[dict, list[dict]]:
    from model import GenerationSettings

    lm = run.lm
    ids = lm.tokenize(text_of_tokens(lm, n_tokens, seed=3))[:n_tokens]
    lm.encode_tree(ids[: 2 * lm.config.chunk_len])  # warm-up: the first call pays allocations and kernel set-up
    t0 = time.perf_counter()
    tree = lm.encode_tree(ids)
    encode_s = time.perf_counter() - t0
    enc = {"tokens": len(ids), "encode_s": encode_s, "tokens_per_s": len(ids) / encode_s,
           "tree_bytes_per_token": tree.nbytes() / len(ids), "chunks": tree.n_chunks}
    rows = []
    settings = GenerationSettings(max_new_tokens=run.max_new_tokens)
    messages = [{"role": "user", "content": QUESTION}]
    for n in tiled:
        big = tile_tree(tree, n)
        query_s, query = _median_time(lambda: lm.model.query_vector(torch.tensor(lm.tokenize(QUESTION))))
        search_s, _ = _median_time(lambda big=big, query=query: lm.model.build_memory([big], query))
        memory = lm.build_memory([big], QUESTION)
        stream = lm.generate(messages, memory, settings, retrieval_s=query_s + search_s)
        for _ in stream:
            pass
        r = stream.result
        rows.append({"tokens": big.n_tokens, "memory_positions": memory.n_positions, "query_vector_s": query_s,
                     "search_gather_s": search_s, "ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s,
                     "tiled": big.n_tokens != len(ids)})
        log.info("tiled %d tokens: search+gather %.3f s, ttft %.2f s", big.n_tokens, search_s, r.ttft_s)
        del big, memory
    return enc, rows


def run_model(run: Run, lengths: list[int], tiled: list[int], prompt_tokens: int, data_dir: Path,
              model_path: str | None):
    started = time.perf_counter()
    section = run.section("model", "Engine level: tree encoding, search + gather, our decoder vs transformers")
    raw: dict = {"encode": [], "tiled": []}
    for n in lengths:
        enc, rows = encode_and_search(run, n, tiled if n == lengths[0] else [])
        raw["encode"].append(enc)
        raw["tiled"] += rows
    section.raw = raw
    section.tables.append(Table(
        ["document tokens", "chunks", "encode s", "encode tok/s", "tree bytes/token (in memory)"],
        [[e["tokens"], e["chunks"], e["encode_s"], e["tokens_per_s"], e["tree_bytes_per_token"]] for e in raw["encode"]],
        title="context-tree encoding (lower model, every node of levels 1..h)"))
    section.tables.append(Table(
        ["document tokens", "tree", "memory positions", "query vector s", "search+gather s", "sharedllm TTFT s",
         "decode tok/s"],
        [[r["tokens"], "tiled" if r["tiled"] else "encoded", r["memory_positions"], r["query_vector_s"],
          r["search_gather_s"], r["ttft_s"], r["tokens_per_s"]] for r in raw["tiled"]],
        title=f"query time with the memory (TTFT includes query vector + search + gather; {run.max_new_tokens} new tokens)"))
    cmp = ours_vs_hf(run, prompt_tokens, data_dir, model_path)
    raw["ours_vs_hf"] = cmp
    section.tables.append(Table(
        ["decoder", "prompt tokens", "TTFT s", "decode tok/s", "new tokens"],
        [["ours (" + cmp["attention"] + ")", cmp["prompt_tokens"], cmp["ours"]["ttft_s"], cmp["ours"]["tokens_per_s"],
          cmp["ours"]["tokens"]],
         ["transformers generate", cmp["prompt_tokens"], cmp["hf"]["ttft_s"], cmp["hf"]["tokens_per_s"], cmp["hf"]["tokens"]],
         ["ratio ours / transformers", "", ratio(cmp["ours"]["ttft_s"], cmp["hf"]["ttft_s"]),
          ratio(cmp["ours"]["tokens_per_s"], cmp["hf"]["tokens_per_s"]), ""]],
        title="same base model, same prompt, greedy, no memory"))
    section.notes.append(f"greedy tokens of ours and transformers agree on the first {cmp['compared_tokens']} tokens: "
                         f"{cmp['greedy_tokens_agree']}")
    section.notes.append("`tiled` rows repeat the encoded tree's chunks to reach the length: search, gather and "
                         "cross-attention cost depend only on the shapes, not on the text.")
    if raw["tiled"]:
        xs = [r["tokens"] for r in raw["tiled"]]
        path = plot_lines(run.figure("model-query-time"), "sharedllm query-time cost vs document length",
                          "document tokens", "seconds",
                          {"search+gather": (xs, [r["search_gather_s"] for r in raw["tiled"]]),
                           "TTFT (incl. search)": (xs, [r["ttft_s"] for r in raw["tiled"]])},
                          run.machine, run.command, section.weights, logx=True, logy=True)
        section.figures.append(run.rel(path))
    return run.write(section, started)
