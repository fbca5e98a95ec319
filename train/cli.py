"""`sharedllm train` / `python -m train`: train SharedLLM weights for a base model."""

from __future__ import annotations

import argparse
import dataclasses
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
    recipe = parser.add_argument_group("recipe (train.recipe.Recipe; each flag overrides --recipe's value)")
    recipe.add_argument("--recipe", type=Path, default=None, help="a recipe.json (as a run directory holds)")
    recipe.add_argument("--layout", choices=["project", "paper"], default=None,
                        help="project: M = N/2 over 512-token chunks (default); paper: M = 4 over 1,024")
    recipe.add_argument("--key-rotation", choices=["chunk", "node_and_chunk"], default=None,
                        help="default node_and_chunk (the authors': intra-node rotation kept under the chunk's)")
    recipe.add_argument("--keep-rates", default=None, help="per level, e.g. 0.0625,0.125,1 (the default)")
    recipe.add_argument("--init-mode", default=None, choices=["zero", "copy", "none"],
                        help="zero (default: equals the base model), none (random, the authors'), copy")
    recipe.add_argument("--retrieval-vector", default=None, choices=["last", "mean"],
                        help="node/query vector for the query-aware search (default mean; saved with the weights)")
    recipe.add_argument("--lm-stage-items", type=int, default=None,
                        help="the first N items are dense LM items (2-4K running tokens, loss on every token)")
    recipe.add_argument("--lm-running-tokens", default=None, help="range of the LM stage's running text, e.g. 2048,4096")
    recipe.add_argument("--stage2-tasks", default=None, help="tasks after the LM stage, e.g. needle,passkey (default all)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--batch-items", type=int, default=0,
                       help="items per forward (the batched path, train/batched.py); 0 = one item per forward")
    speed.add_argument("--pad-multiple", type=int, default=1, help="pad lengths to multiples of this (with --compile)")
    speed.add_argument("--compile", action="store_true", help="torch.compile decoder layers and cross-attention")
    speed.add_argument("--bf16-autocast", action="store_true",
                       help="batched path on CPU: the upper model under bfloat16 autocast (always on CUDA)")
    speed.add_argument("--base-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="the frozen base model's dtype; auto: bfloat16 on CUDA, float32 elsewhere "
                            "(the cross-attention keeps float32 master weights)")
    parser.add_argument("--no-reading-gap", action="store_true",
                        help="evaluate with the own document only (the gap costs a second pass)")
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


def recipe_from_args(args: argparse.Namespace):
    """--recipe FILE (or the defaults), then every recipe flag that was given."""
    from train.recipe import Recipe

    recipe = Recipe.from_json(args.recipe.read_text()) if args.recipe else Recipe()

    def numbers(text: str | None, kind):
        return None if text is None else tuple(kind(x) for x in text.split(","))

    given = {
        "layout": args.layout, "key_rotation": args.key_rotation, "keep_rates": numbers(args.keep_rates, float),
        "init_mode": args.init_mode, "retrieval_vector": args.retrieval_vector, "lm_stage_items": args.lm_stage_items,
        "lm_running_tokens": numbers(args.lm_running_tokens, int), "stage2_tasks": numbers(args.stage2_tasks, str),
    }
    return dataclasses.replace(recipe, **{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace, data_dir: Path) -> Path:
    import torch

    from model.loading import read_model_config, resolve_checkpoint
    from model.runtime import load_model
    from train.data.pack import ShardReader
    from train.loop import TrainConfig, train

    recipe = recipe_from_args(args)
    if args.init_weights:  # the weights' own configuration; only the retrieval vector may be overridden
        overrides = {"retrieval_vector": args.retrieval_vector} if args.retrieval_vector else {}
    else:  # a fresh start from the recipe, never the shipped weights picked up silently
        overrides = recipe.model_overrides(read_model_config(resolve_checkpoint(args.base_model, data_dir)))
    # float32 master weights; CUDA compute runs under bfloat16 autocast
    lm = load_model(args.base_model, data_dir, device=args.device, dtype="float32", weights=args.init_weights or False,
                    **overrides)
    base_dtype = args.base_dtype if args.base_dtype != "auto" else ("bfloat16" if lm.device.type == "cuda" else "float32")
    if base_dtype == "bfloat16":  # the frozen base in bf16; trained parts stay float32
        lm.model.base.to(torch.bfloat16)
        if args.train_top_layers:
            for layer in lm.model.base.layers[-args.train_top_layers:]:
                layer.float()
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
                      time_budget_s=args.time_budget_s, batch_items=args.batch_items, pad_multiple=args.pad_multiple,
                      compile=args.compile, bf16=True if args.bf16_autocast else None,
                      reading_gap=not args.no_reading_gap, recipe=recipe)
    train(lm.model, lm.tokenizer, train_items, eval_items, cfg, title=f"SharedLLM on {lm.name}: {args.steps} steps")
    lm.model.save_pretrained(out / "weights", extra={"steps": cfg.steps, "items": cfg.steps * cfg.items_per_step,
                                                     "train_data": str(args.train_data), "recipe": recipe.to_json()})
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
