"""The SharedLLM training loop: teaches the cross-attention blocks to read the context tree.

Only `xattn` trains (optionally the upper model's top layers, `--train-top-layers`). Two paths give
the same loss (`tests/train/test_batched.py`): the per-item path (`batch_items=0`, one item per
forward: its context is encoded into a tree without gradient, split noise as in the paper, the
memory built with the query-aware policy for question items or the language-modelling policy) and
the batched path (`batch_items=B`, `train.batched`: B items per forward). The loss is next-token
cross-entropy on the target tokens only. The recipe (`train.recipe.Recipe`) adds a dense LM stage
before the data's QA mix. AdamW (fused on CUDA), linear warm-up then
cosine decay, gradient accumulation, gradient checkpointing, periodic held-out evaluation, resumable
checkpoints (safetensors + JSON, no pickle), a loss curve PNG.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.sharedllm import SharedLLM
from train.batched import batch_loss
from train.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out: Path
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    grad_accum: int = 4
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 50
    eval_items: int = 16
    save_every: int = 50
    train_top_layers: int = 0
    gradient_checkpointing: bool = True
    max_context_tokens: int | None = None  # truncate contexts (CPU budgets)
    seed: int = 0
    # wall-clock budget (seconds, None = none): every `calibration_steps` the step count is re-fitted
    # (never above --steps) to what the recent pace allows, so the cosine schedule completes inside
    # the budget; past the budget training stops and saves
    time_budget_s: float | None = None
    calibration_steps: int = 20
    batch_items: int = 0  # items per forward (train.batched); 0 = the per-item path, one item per forward
    pad_multiple: int = 1  # pad node and running-text lengths to multiples of this (repeating shapes for compile)
    compile: bool = False  # torch.compile the decoder layers and cross-attention blocks (batched path)
    bf16: bool | None = None  # batched path: upper model under bf16 autocast (None: on CUDA only)
    reading_gap: bool = True  # also evaluate with another item's document (the loss gap reading buys)
    recipe: Recipe = field(default_factory=Recipe)

    @property
    def items_per_step(self) -> int:
        return self.grad_accum * max(1, self.batch_items)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1))))


def trainable_parameters(model: SharedLLM, top_layers: int) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.xattn.parameters())
    if top_layers:
        params += [p for layer in model.base.layers[-top_layers:] for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def question_ids(prompt_ids: list[int], tokenizer) -> list[int] | None:
    """The last user message of a chat-templated prompt, re-tokenised alone (the query)."""
    if not prompt_ids:
        return None
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    marker = "<|im_start|>user\n"
    if marker not in text:
        return None
    question = text.rsplit(marker, 1)[1].split("<|im_end|>", 1)[0].strip()
    return tokenizer(question, add_special_tokens=False)["input_ids"] or None


def item_loss(model: SharedLLM, item: dict, tokenizer, cfg: TrainConfig,
              generator: torch.Generator | None) -> torch.Tensor:
    device = model.base.embed_tokens.weight.device
    context = [int(t) for t in item["context_ids"]]
    if cfg.max_context_tokens:
        context = context[: cfg.max_context_tokens]
    prompt = [int(t) for t in item["prompt_ids"]]
    target = [int(t) for t in item["target_ids"]]
    noise = model.config.split_noise if generator is not None else 0.0
    tree = model.encode_tree(context, noise=noise, generator=generator)
    question = question_ids(prompt, tokenizer)
    query = model.query_vector(torch.tensor(question)) if question else None
    memory = model.build_memory([tree], query)
    ids = torch.tensor([prompt + target[:-1]], device=device) if prompt else torch.tensor([target[:-1]], device=device)
    labels = torch.tensor(target if prompt else target[1:], device=device)
    # on CUDA: float32 master weights, bfloat16 compute
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(ids, memory=memory)[0, -len(labels):]  # (T_target, V)
    return F.cross_entropy(logits.float(), labels)


def prompt_question(item: dict, tokenizer) -> list[int] | None:
    return question_ids([int(t) for t in item["prompt_ids"]], tokenizer)


@torch.no_grad()
def item_losses(model: SharedLLM, items: list[dict], tokenizer, cfg: TrainConfig) -> list[float]:
    """Held-out target loss of every item (no split noise). The model's train/eval mode is restored
    afterwards: the decoder recomputes layers in backward only in training mode, and leaving it in
    eval mode once silently turned gradient checkpointing off for the rest of the run."""
    was_training = model.training
    model.eval()
    if cfg.batch_items:
        losses = []
        for i in range(0, len(items), cfg.batch_items):
            chunk = items[i:i + cfg.batch_items]
            questions = [prompt_question(it, tokenizer) for it in chunk]
            losses += batch_loss(model, chunk, questions, cfg.max_context_tokens, None, cfg.pad_multiple,
                                 cfg.bf16)[1].tolist()
    else:
        losses = [float(item_loss(model, it, tokenizer, cfg, None)) for it in items]
    model.train(was_training)
    return losses


def evaluate(model: SharedLLM, items: list[dict], tokenizer, cfg: TrainConfig) -> float:
    """Mean held-out target loss."""
    losses = item_losses(model, items, tokenizer, cfg)
    return sum(losses) / max(1, len(losses))


def reading_gap(model: SharedLLM, items: list[dict], tokenizer, cfg: TrainConfig) -> dict:
    """Held-out loss with each item's own document in the memory vs the next item's (cyclically):
    what reading buys. Equal losses mean the cross-attention learnt something document-independent
    (answer format, a bias), not to read. Returns own, other, gap (other - own, nats) overall and
    per task."""
    if len(items) < 2:
        raise ValueError("the reading gap needs at least two items (one lends the other its document)")
    swapped = [{**it, "context_ids": items[(k + 1) % len(items)]["context_ids"]} for k, it in enumerate(items)]
    own, other = item_losses(model, items, tokenizer, cfg), item_losses(model, swapped, tokenizer, cfg)

    def summary(rows: list[int]) -> dict:
        o, x = sum(own[r] for r in rows) / len(rows), sum(other[r] for r in rows) / len(rows)
        return {"items": len(rows), "own": o, "other": x, "gap": x - o}

    tasks: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        tasks.setdefault(str(it.get("task", "?")), []).append(k)
    return {**summary(list(range(len(items)))), "tasks": {t: summary(rows) for t, rows in sorted(tasks.items())}}


def evaluation_entry(model: SharedLLM, items: list[dict], tokenizer, cfg: TrainConfig, step: int) -> dict:
    if cfg.reading_gap and len(items) >= 2:
        gap = reading_gap(model, items, tokenizer, cfg)
        entry = {"step": step, "eval_loss": gap["own"], "eval_loss_other": gap["other"], "reading_gap": gap["gap"]}
    else:
        entry = {"step": step, "eval_loss": evaluate(model, items, tokenizer, cfg)}
    log.info("step %d held-out %s", step, {k: round(v, 4) for k, v in entry.items() if k != "step"})
    return entry


class ItemStream:
    """The training items in the run's shuffled order, through the recipe's stages: the first
    `lm_stage_items` are dense LM views, then items of `stage2_tasks` (all tasks by default).
    `cursor` (saved in the checkpoint) counts items taken from the order.

    Micro-batches of n > 1 items are bucketed: `bucket_pool` x n items are drawn, sorted by
    running-text and context length and cut into micro-batches served in random order, so a
    batch's padding stays small (a 20-token question padded to a 2K-token LM item would cost as
    much as the LM item). A pool never straddles the end of the LM stage. Resuming drops what was
    left in the pool."""

    def __init__(self, items, cfg: TrainConfig, chunk_len: int, tokenizer, cursor: int = 0,
                 bucket_pool: int = 8) -> None:
        self.items, self.recipe, self.chunk_len, self.tokenizer = items, cfg.recipe, chunk_len, tokenizer
        self.order = list(range(len(items)))
        self.rng = random.Random(cfg.seed)
        self.rng.shuffle(self.order)
        self.cursor, self.bucket_pool = cursor, bucket_pool
        self._questions: dict[int, list[int] | None] = {}
        self._ready: list[tuple[list[dict], list[list[int] | None]]] = []

    def take(self, n: int) -> tuple[list[dict], list[list[int] | None]]:
        if n == 1 or self.bucket_pool <= 1:
            return self._draw(n)
        if not self._ready:
            size = n * self.bucket_pool
            if self.cursor < self.recipe.lm_stage_items:  # a pool never straddles the end of the LM stage
                size = min(size, -(-(self.recipe.lm_stage_items - self.cursor) // n) * n)
            pool = list(zip(*self._draw(size)))
            pool.sort(key=lambda pair: (len(pair[0]["prompt_ids"]) + len(pair[0]["target_ids"]),
                                        len(pair[0]["context_ids"])))
            self._ready = [tuple(map(list, zip(*pool[i:i + n]))) for i in range(0, len(pool), n)]
            self.rng.shuffle(self._ready)
        return self._ready.pop()

    def _draw(self, n: int) -> tuple[list[dict], list[list[int] | None]]:
        batch, questions = [], []
        for _ in range(100 * n):
            if len(batch) == n:
                break
            index = self.order[self.cursor % len(self.order)]
            self.cursor += 1
            item = self.items[index]
            if self.cursor <= self.recipe.lm_stage_items:
                batch.append(self.recipe.dense_lm_view(item, random.Random(f"lm:{self.cursor}"), self.chunk_len))
                questions.append(None)
            elif self.recipe.stage2_tasks is None or item.get("task") in self.recipe.stage2_tasks:
                if index not in self._questions:
                    self._questions[index] = prompt_question(item, self.tokenizer)
                batch.append(item)
                questions.append(self._questions[index])
        if len(batch) < n:
            raise ValueError(f"no items of tasks {self.recipe.stage2_tasks} in the training data")
        return batch, questions


# --- checkpoints (safetensors + JSON) --------------------------------------------------------------
def save_checkpoint(model: SharedLLM, optimizer: torch.optim.Optimizer, step: int, history: list, cfg: TrainConfig,
                    params: list[torch.nn.Parameter], cursor: int | None = None) -> None:
    ckpt = cfg.out / "checkpoint"
    tmp = cfg.out / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, extra={"step": step})
    opt_state = {}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                opt_state[f"{i}.{key}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
    if params and cfg.train_top_layers:
        top = {k: v.detach().cpu().contiguous() for k, v in model.base.layers[-cfg.train_top_layers:].state_dict().items()}
        save_file(top, str(tmp / "top_layers.safetensors"))
    save_file(opt_state or {"empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "cursor": cursor, "history": history,
                                                  "config": asdict(cfg)}, default=str, indent=1))
    if ckpt.exists():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    tmp.rename(ckpt)


def load_checkpoint(model: SharedLLM, optimizer, params, cfg: TrainConfig) -> tuple[int, list, int]:
    """-> (step, history, items taken from the stream); (0, [], 0) without a checkpoint."""
    ckpt = cfg.out / "checkpoint"
    if not (ckpt / "trainer.json").is_file():
        return 0, [], 0
    model.load_cross_attention(ckpt)
    if (ckpt / "top_layers.safetensors").is_file():
        model.base.layers[-cfg.train_top_layers:].load_state_dict(load_file(str(ckpt / "top_layers.safetensors")))
    opt_state = load_file(str(ckpt / "optimizer.safetensors"))
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in opt_state:
            optimizer.state[p] = {key: opt_state[f"{i}.{key}"].to(p.device) for key in ("exp_avg", "exp_avg_sq", "step")}
    info = json.loads((ckpt / "trainer.json").read_text())
    log.info("resumed from step %d", info["step"])
    cursor = info.get("cursor")
    return int(info["step"]), info["history"], int(cursor if cursor is not None else info["step"] * cfg.items_per_step)


def plot_history(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, label=f"train (moving avg {window})")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out")
    other = [(h["step"], h["eval_loss_other"]) for h in history if "eval_loss_other" in h]
    if other:
        ax.plot(*zip(*other), "x--", label="held-out, another item's document")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on target tokens")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_steps_to_budget(cfg: TrainConfig, step: int, elapsed: float, start: int, per_step: float | None = None,
                        ceiling: int | None = None) -> None:
    """Sets `cfg.steps` to what the rest of the time budget allows at `per_step` (default: the
    average pace so far, evaluations included), keeping 5% in reserve for the last checkpoint and
    never above `ceiling` (the steps asked for). The cosine schedule follows the new length."""
    per_step = per_step or elapsed / max(1, step - start)
    remaining = cfg.time_budget_s * 0.95 - elapsed
    fit = min(step + max(1, int(remaining / per_step)), ceiling or cfg.steps)
    if fit != cfg.steps:
        log.info("%.2f s per step: %d steps fit the %.0f s budget (was %d)", per_step, fit, cfg.time_budget_s,
                 cfg.steps)
        cfg.steps = fit


def compile_blocks(model: SharedLLM) -> None:
    """torch.compile every decoder layer and cross-attention block in place (dynamic shapes; with
    `pad_multiple` the shapes repeat). Optional: not measured on a GPU yet."""
    for module in [*model.base.layers, *model.xattn]:
        module.compile(dynamic=True)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    fused = bool(params) and all(p.is_cuda for p in params)  # one kernel for all parameters
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused)


def micro_batch_loss(model: SharedLLM, stream: ItemStream, tokenizer, cfg: TrainConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """The loss of one micro-batch (a tensor: nothing here waits for the device)."""
    if cfg.batch_items:
        items, questions = stream.take(cfg.batch_items)
        return batch_loss(model, items, questions, cfg.max_context_tokens, generator, cfg.pad_multiple, cfg.bf16)[0]
    (item,), _ = stream.take(1)
    return item_loss(model, item, tokenizer, cfg, generator)


def train(model: SharedLLM, tokenizer, train_items, eval_items: list[dict], cfg: TrainConfig,
          title: str = "SharedLLM training") -> list[dict]:
    """Runs (or resumes) training; returns the loss history. `train_items` supports len/indexing."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(model, cfg.train_top_layers)
    optimizer = make_optimizer(params, cfg)
    start, history, cursor = load_checkpoint(model, optimizer, params, cfg)
    cfg.recipe.save(cfg.out / "recipe.json")
    model.base.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()  # loaders hand out eval-mode models; checkpointing needs training mode
    if cfg.compile:
        compile_blocks(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    stream = ItemStream(train_items, cfg, model.config.chunk_len, tokenizer, cursor)
    started = time.perf_counter()
    if start == 0 and eval_items:  # the starting point (for `zero` init: the base model without context)
        history.append(evaluation_entry(model, eval_items, tokenizer, cfg, 0))
    step = start
    requested_steps = cfg.steps
    while step < cfg.steps:
        if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
            log.warning("time budget of %.0f s spent at step %d of %d: stopping", cfg.time_budget_s, step, cfg.steps)
            cfg.steps = step
            save_checkpoint(model, optimizer, step, history, cfg, params, stream.cursor)
            plot_history(history, cfg.out / "loss.png", title)
            break
        if cfg.time_budget_s is not None and step > start and (step - start) % cfg.calibration_steps == 0:
            # re-fit at every calibration point from the recent pace (kernels warm up over the run)
            now = time.perf_counter() - started
            recent = [h for h in history if "elapsed_s" in h and h["step"] > step - cfg.calibration_steps]
            window = (recent[-1]["elapsed_s"] - recent[0]["elapsed_s"]) / max(1, len(recent) - 1) if len(recent) > 2 else None
            fit_steps_to_budget(cfg, step, now, start, per_step=window, ceiling=requested_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        total = torch.zeros(())
        for _ in range(cfg.grad_accum):
            loss = micro_batch_loss(model, stream, tokenizer, cfg, generator) / cfg.grad_accum
            loss.backward()
            total = total.to(loss.device) + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(total), "lr": lr_at(step, cfg),  # one host sync per step
                        "items": (step + 1) * cfg.items_per_step, "elapsed_s": round(time.perf_counter() - started, 1)})
        log.info("step %d loss %.4f lr %.2e", step + 1, history[-1]["loss"], lr_at(step, cfg))
        if eval_items and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            history.append(evaluation_entry(model, eval_items, tokenizer, cfg, step + 1))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(model, optimizer, step + 1, history, cfg, params, stream.cursor)
            plot_history(history, cfg.out / "loss.png", title)
        step += 1
    model.base.gradient_checkpointing = False
    model.eval()
    return history
