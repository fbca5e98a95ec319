"""The half of `bench.gpu_speed` that runs here: turns the JSON that `measure` wrote on the GPU
machine into the `gpu` section of docs/benchmarks.md (tables, pair-by-pair ratios, plots). Kept apart
so the measuring half needs nothing but torch and `model/` on a machine without the app."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _column(rows: list[dict], key: str) -> tuple[list, list]:
    """(document tokens, the rows' values of `key`); missing values are not drawn by plot_lines."""
    return [r["tokens"] for r in rows], [r.get(key) for r in rows]


def report(args: argparse.Namespace) -> int:
    """Writes the `gpu` section of docs/benchmarks.md (tables, ratios, plots) from measured JSON."""
    from bench.report import Section, Table, plot_lines, write_raw, write_section

    runs = [json.loads(Path(path).read_text()) for path in args.results]
    data = dict(runs[0])
    data["models"] = [dict(m, command=run["command"]) for run in runs for m in run["models"]]
    data["command"] = " ; ".join(dict.fromkeys(run["command"] for run in runs))
    md = Path(args.md)
    img = md.parent / "img"
    section = Section(
        key="gpu",
        title=f"GPU: sharedllm vs full attention, 8K-128K ({data['device']})",
        machine=f"{data['device']}, torch {data['torch']}, {data['dtype']}",
        command=data["command"],
        weights="see each table",
        started=data["started"],
    )
    for entry in data["models"]:
        rows = entry["rows"]
        g = "gpu" if any("sharedllm_gpu_ttft_s" in r for r in rows) else "ram"
        section.tables.append(
            Table(
                [
                    "document tokens",
                    "encode s",
                    "ingest tok/s",
                    "full TTFT s",
                    "sharedllm TTFT s (tree on GPU)",
                    "full ÷ sharedllm (tree on GPU)",
                    "sharedllm TTFT s (tree in RAM)",
                    "full ÷ sharedllm (tree in RAM)",
                    "rag-size TTFT s",
                    "decode tok/s sharedllm / full",
                    "peak GiB sharedllm / full",
                ],
                [
                    [
                        r["tokens"],
                        r["sharedllm_encode_s"],
                        r["sharedllm_encode_tok_s"],
                        r.get("full_ttft_s", r.get("full_error")),
                        r.get("sharedllm_gpu_ttft_s"),
                        r.get("ttft_speedup_gpu"),
                        r["sharedllm_ram_ttft_s"],
                        r.get("ttft_speedup_ram"),
                        r["rag_ttft_s"],
                        f"{r[f'sharedllm_{g}_decode_tok_s']:.1f} / {r.get('full_decode_tok_s') or float('nan'):.1f}",
                        f"{r[f'sharedllm_{g}_peak_gib'] or 0:.1f} / {r.get('full_peak_gib') or float('nan'):.1f}",
                    ]
                    for r in rows
                ],
                title=(
                    f"{entry['label']}: attention {entry['attention']}, M = {entry['n_inject_layers']}, "
                    f"L = {entry['chunk_len']}, weights {entry['weights_gib']:.1f} GiB, loaded in {entry['load_s']:.1f} s; "
                    f"`{entry['command']}`"
                ),
            )
        )
        if entry.get("vs_transformers"):
            section.tables.append(
                Table(
                    [
                        "prompt tokens",
                        "ours TTFT s",
                        "transformers TTFT s",
                        "TTFT ours ÷ transformers",
                        "ours decode tok/s",
                        "transformers decode tok/s",
                        "greedy tokens agreeing",
                    ],
                    [
                        [
                            v["prompt_tokens"],
                            v["ours_ttft_s"],
                            v["hf_ttft_s"],
                            v["ours_ttft_s"] / v["hf_ttft_s"],
                            v["ours_decode_tok_s"],
                            v["hf_decode_tok_s"],
                            f"{v['greedy_tokens_agree']} of {v['compared_tokens']}",
                        ]
                        for v in entry["vs_transformers"]
                    ],
                    title=f"{entry['label']}: our decoder vs transformers' generate, same weights, no memory",
                )
            )
        if entry.get("decode"):
            d = entry["decode"]
            bound = args.hbm_gbs * 1e9 / d["weight_bytes"] if args.hbm_gbs else None
            section.tables.append(
                Table(
                    ["decoder", "decode tok/s (batch 1)", "HBM bound tok/s", "share of the bound"],
                    [[mode, d.get(key), bound, d[key] / bound if bound and d.get(key) else None]
                     for mode, key in (("eager", "eager_tok_s"), ("torch.compile reduce-overhead", "compiled_tok_s"))
                     if key in d],
                    title=(f"{entry['label']}: decode after a {d['prompt_tokens']}-token prompt against reading "
                           f"{d['weight_bytes'] / 2**30:.1f} GiB of weights per token at {args.hbm_gbs} GB/s"),
                )
            )
        name = entry["name"]
        figures = [
            ("ttft", "TTFT", "seconds", True, {
                "sharedllm, tree in RAM": _column(rows, "sharedllm_ram_ttft_s"),
                "sharedllm, tree on GPU": _column(rows, "sharedllm_gpu_ttft_s"),
                f"rag-size prompt ({rows[0]['rag_prompt_tokens']} tokens)": _column(rows, "rag_ttft_s"),
                "full attention": _column(rows, "full_ttft_s"),
            }),
            ("memory", "peak GPU memory", "GiB", False, {
                "sharedllm query (tree in RAM)": _column(rows, "sharedllm_ram_peak_gib"),
                "sharedllm query (tree on GPU)": _column(rows, "sharedllm_gpu_peak_gib"),
                "full attention": _column(rows, "full_peak_gib"),
            }),
        ]
        for kind, what, unit, logy, series in figures:
            path = plot_lines(img / f"gpu-{kind}-{name}.png",
                              f"{what} vs document length, {entry['label']}", "document tokens", unit, series,
                              section.machine, entry["command"], entry["label"], logx=True, logy=logy)
            section.figures.append(str(path.relative_to(md.parent)))
    section.notes += [
        "Pairs are measured in one process on the same random token ids; TTFT is the median of 3 for sharedllm "
        "(query vector + search + gather + prefill of the question with cross-attention + first token), with the "
        "tree's K/V in host RAM (as the store maps it: the memory crosses PCIe per question) and resident on the "
        "GPU (`ContextTree.kv_to`: the gather runs on the GPU), and the "
        "best of 1-2 for full (the whole document + question prefilled, causal attention over all of it, no "
        "truncation). Decode: 32 greedy tokens with the KV cache.",
        "Random weights of a public configuration measure speed and memory only (kernels do not depend on the "
        "values); `default` rows use the bundled model's real weights.",
        "peak GiB sharedllm: the query with the tree resident on the GPU (weights + the tree's K/V + the memory); "
        "full: weights + the KV cache of the whole document + activations of its prefill.",
        "flash-attn: no wheel reaches the GPU machine (no registry there; PyPI ships flash-attn as source), so "
        "attention ran through PyTorch SDPA, which picks its own flash kernel for bf16 on Hopper.",
    ]
    write_section(md, section)
    write_raw(Path(args.raw_dir) / "gpu.json", section)
    return 0
