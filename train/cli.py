"""`sharedllm train` / `python -m train`: train SharedLLM weights for a base model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-data", required=True, help="shard directory (python -m train.data)")
    parser.add_argument("--eval-data", help="held-out shard directory")
    parser.add_argument("--out", required=True, help="output directory (checkpoint/, loss.png, weights)")
    parser.add_argument("--base-model", default=None,
                        help="bundled name (default: qwen2.5-0.5b; smollm2), checkpoint directory or .gguf; "
                             "the training shards must be tokenized for it (python -m train.data --model)")
    parser.add_argument("--init-weights", default=None, help="start from these SharedLLM weights")
    parser.add_argument("--init-mode", default="zero", choices=["zero", "copy"])
    parser.add_argument("--retrieval-vector", default=None, choices=["last", "mean"],
                        help="node/query vector for the query-aware search (saved with the weights)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-items", type=int, default=16)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--train-top-layers", type=int, default=0)
    parser.add_argument("--max-context-tokens", type=int, default=None)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall-clock budget: fewer steps (schedule intact) if --steps would not fit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, data_dir: Path) -> Path:
    from model.runtime import load_model
    from train.data.pack import ShardReader
    from train.loop import TrainConfig, train

    # float32 master weights everywhere; the loop runs CUDA compute under bfloat16 autocast
    overrides = {} if args.init_weights else {"init_mode": args.init_mode}
    if args.retrieval_vector:
        overrides["retrieval_vector"] = args.retrieval_vector
    # without --init-weights: a fresh `--init-mode` start, never the shipped weights picked up silently
    lm = load_model(args.base_model, data_dir, device=args.device, dtype="float32", weights=args.init_weights or False,
                    **overrides)
    train_items = ShardReader(args.train_data, with_meta=False)
    check_shards_match(train_items.manifest, lm, args.train_data)
    eval_items = []
    if args.eval_data:
        reader = ShardReader(args.eval_data, with_meta=False)
        eval_items = [reader[i] for i in range(min(args.eval_items, len(reader)))]
    out = Path(args.out)
    cfg = TrainConfig(out=out, steps=args.steps, lr=args.lr, warmup=args.warmup, grad_accum=args.grad_accum,
                      eval_every=args.eval_every, eval_items=args.eval_items, save_every=args.save_every,
                      train_top_layers=args.train_top_layers, max_context_tokens=args.max_context_tokens,
                      gradient_checkpointing=not args.no_gradient_checkpointing, seed=args.seed,
                      time_budget_s=args.time_budget_s)
    train(lm.model, lm.tokenizer, train_items, eval_items, cfg, title=f"SharedLLM on {lm.name}: {args.steps} steps")
    lm.model.save_pretrained(out / "weights", extra={"steps": cfg.steps, "train_data": str(args.train_data)})
    log.info("weights written to %s", out / "weights")
    return out / "weights"


def check_shards_match(manifest: dict, lm, path) -> None:
    """Token ids only mean something with the tokenizer that made them: refuse shards of another model."""
    made_for, vocab = manifest.get("tokenizer"), manifest.get("vocab_size")
    if vocab != len(lm.tokenizer) or (made_for and made_for != lm.name):
        raise SystemExit(
            f"{path} was tokenized for {made_for} (vocabulary {vocab}), not for {lm.name} "
            f"(vocabulary {len(lm.tokenizer)}): make shards with `python -m train.data --model ...` "
            "or pass --base-model for the model they were made for"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--data-dir", default="data")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(args, Path(args.data_dir))
    return 0
