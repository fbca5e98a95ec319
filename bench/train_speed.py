"""Training throughput: the per-item path (the old loop) against the batched path, in one run.

    python -m bench.train_speed --model build/test-data/models/SmolLM2-135M-Instruct --items 8 \\
        --min-ctx 1024 --max-ctx 2048 --steps 2 [--device cuda] [--json OUT.json]

Both paths run the loop's own step (`train.loop.micro_batch_loss`, backward, clipping, AdamW) on
the same synthetic items (random token ids: speed does not depend on content; `--task lm`: 256
target tokens, `qa`: a question and a 12-token answer, `mixed`: half each), the same model and the
same items in every optimizer step (the per-item path accumulates `--items` items, the batched path
takes them in one micro-batch; no bucketing, so the items match). The paths are interleaved round by
round; round 0 is a warm-up and is not timed. Useful FLOPs are counted analytically (lower model over
every level's nodes, upper model forward and input-gradient backward over the running text,
cross-attention weight gradients, logits at target positions), so MFU is the same work divided by
time and by `--peak-tflops` (default: a dense matmul measured in this run on this device in the
model's dtype).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def synthetic_items(tokenizer, n: int, min_ctx: int, max_ctx: int, vocab: int, seed: int,
                    task: str = "mixed") -> list[dict]:
    rng = random.Random(seed)
    question = tokenizer("<|im_start|>user\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False)["input_ids"]
    items = []
    for k in range(n):
        ctx = int(math.exp(rng.uniform(math.log(min_ctx), math.log(max_ctx))))
        lm = task == "lm" or (task == "mixed" and k % 2 == 0)
        items.append({
            "context_ids": np.array([rng.randrange(vocab) for _ in range(ctx)]),
            "prompt_ids": np.array([] if lm else question, dtype=np.int64),
            "target_ids": np.array([rng.randrange(vocab) for _ in range(256 if lm else 12)]),
            "task": "lm" if lm else "passkey",
        })
    return items


def item_flops(model, item: dict) -> float:
    """Useful FLOPs of one training item (see the module docstring)."""
    base, cfg = model.base.config, model.config
    d, hd, nh, nkv = base.dim, base.head_dim, base.n_head, base.n_kv_head
    layer = 2 * (d * nh * hd * 2 + d * nkv * hd * 2 + 3 * d * base.intermediate_size)  # per token, matmuls
    ctx, prompt, target = len(item["context_ids"]), len(item["prompt_ids"]), len(item["target_ids"])
    lower = 0.0
    for level in range(1, cfg.tree_height + 1):  # each level covers the context once, nodes of L/2^l
        width = cfg.chunk_len / 2**level
        lower += ctx * cfg.n_inject_layers * (layer + 2 * width * nh * hd)
    run = prompt + target - 1
    n_chunks = math.ceil(ctx / cfg.chunk_len)
    memory = n_chunks * cfg.memory_slots_per_chunk()
    xattn = 2 * 2 * d * nh * hd + 4 * memory * nh * hd  # q/o projections + attention to the memory
    upper = run * (base.n_layer * (layer + 2 * run * nh * hd) + cfg.n_inject_layers * xattn)
    xattn_weight_grads = run * cfg.n_inject_layers * 2 * 2 * d * nh * hd
    labels = target if prompt else target - 1
    head = 2 * 2 * base.vocab_size * d * labels
    return lower + 2 * upper + xattn_weight_grads + head


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    n = n or (8192 if device.type == "cuda" else 1024)  # a GPU needs a large product to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_paths(lm, items: list[dict], paths: list[tuple[str, int, bool, bool | None]], rounds: int,
               checkpointing: bool) -> list[dict]:
    """Optimizer steps of `len(items)` items each, the paths interleaved round by round (a shared
    machine's load then hits every path alike); round 0 is a warm-up. The step is the loop's own:
    `train.loop.micro_batch_loss` per micro-batch, backward, clipping, fused-when-possible AdamW."""
    from train.loop import (
        ItemStream,
        TrainConfig,
        compile_blocks,
        make_optimizer,
        micro_batch_loss,
        trainable_parameters,
    )

    model, n = lm.model, len(items)
    params = trainable_parameters(model, 0)
    model.base.gradient_checkpointing = checkpointing
    model.train()
    setups = []
    for name, batched, compiled, bf16 in paths:
        cfg = TrainConfig(out=None, lr=1e-6, grad_accum=1 if batched else n, batch_items=n if batched else 0,
                          compile=compiled, bf16=bf16)
        # no bucketing: every path sees the same items in every step
        setups.append((name, cfg, ItemStream(items, cfg, model.config.chunk_len, lm.tokenizer, bucket_pool=1),
                       torch.Generator().manual_seed(0), make_optimizer(params, cfg)))
    times: dict[str, list[float]] = {name: [] for name, *_ in setups}
    if any(cfg.compile for _, cfg, *_ in setups):  # compiling changes the shared modules: all paths, then
        compile_blocks(model)
    for r in range(rounds + 1):
        for name, cfg, stream, generator, optimizer in setups:
            started = time.perf_counter()
            for _ in range(cfg.grad_accum):
                (micro_batch_loss(model, stream, lm.tokenizer, cfg, generator) / cfg.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(lm.device)
            if r:
                times[name].append(time.perf_counter() - started)
            log.warning("round %d %s: %.2f s", r, name, time.perf_counter() - started)
    model.eval()
    return [{"path": name, "items_per_step": n, "timed_steps": rounds, "step_s": sorted(times[name]),
             "items_per_s": n / float(np.median(times[name]))} for name, *_ in setups]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="bundled name, checkpoint directory or .gguf")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=8, help="items per optimizer step (both paths)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up round)")
    parser.add_argument("--min-ctx", type=int, default=1024)
    parser.add_argument("--max-ctx", type=int, default=2048)
    parser.add_argument("--task", default="mixed", choices=["mixed", "lm", "qa"],
                        help="lm: 256-token continuations; qa: a question and a 12-token answer; mixed: half each")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the batched path under torch.compile")
    parser.add_argument("--base-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: a matmul measured in this run")
    parser.add_argument("--paths", default="per-item,batched")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from model.loading import read_model_config, resolve_checkpoint
    from model.runtime import load_model
    from train.recipe import Recipe

    overrides = Recipe().model_overrides(read_model_config(resolve_checkpoint(args.model, Path(args.data_dir))))
    lm = load_model(args.model, args.data_dir, device=args.device, dtype="float32", weights=False, **overrides)
    if (args.base_dtype == "auto" and lm.device.type == "cuda") or args.base_dtype == "bfloat16":
        lm.model.base.to(torch.bfloat16)
    items = synthetic_items(lm.tokenizer, args.items, args.min_ctx, args.max_ctx, lm.model.base.config.vocab_size,
                            args.seed, args.task)
    flops = sum(item_flops(lm.model, it) for it in items) / len(items)
    # the fastest dense matmul this device does in either dtype (CPUs with AMX run bf16 autocast faster)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else max(
        matmul_peak(lm.device, dtype) for dtype in (torch.float32, torch.bfloat16))
    wanted = args.paths.split(",")
    cpu = lm.device.type == "cpu"
    candidates = [("per-item (old loop)", 0, False, None), ("batched", 1, False, None)]
    candidates += [("batched + bf16 autocast", 1, False, True)] if cpu else []
    candidates += [("batched + compile", 1, True, None)] if args.compile else []
    paths = [c for c in candidates if c[0].split(" ")[0] in wanted]
    # the compiled variant last and on its own: compiling changes the modules every path shares
    rows = time_paths(lm, items, [c for c in paths if not c[2]], args.steps, args.gradient_checkpointing)
    rows += time_paths(lm, items, [c for c in paths if c[2]], args.steps, args.gradient_checkpointing) \
        if any(c[2] for c in paths) else []
    for row in rows:
        row["tflops"] = row["items_per_s"] * flops / 1e12
        row["mfu"] = row["items_per_s"] * flops / peak
        print(f"{row['path']}: {row['items_per_s']:.3f} items/s (median step), "
              f"{row['tflops'] * 1e3:.1f} GFLOP/s, MFU {100 * row['mfu']:.1f}%", flush=True)
    result = {
        "command": "python -m bench.train_speed " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": str(lm.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "model": lm.name, "M": lm.config.n_inject_layers, "L": lm.config.chunk_len,
        "keep_rates": list(lm.config.keep_rates), "base_dtype": str(lm.model.base.embed_tokens.weight.dtype),
        "mean_context": float(np.mean([len(it["context_ids"]) for it in items])),
        "gflop_per_item": flops / 1e9, "peak_tflops": peak / 1e12, "rows": rows,
    }
    if len(rows) >= 2:
        result["speedup"] = rows[1]["items_per_s"] / rows[0]["items_per_s"]
        print(f"speed-up batched / per-item: {result['speedup']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
