"""Generation as small functions outside the model (gpt-fast style): prefill, decode_one_token,
sample, and a streaming text iterator with EOS, stop strings and a token budget.

The memory (if any) is built once per turn by the caller and read by every step; the running text
uses the model's self-attention KV cache, so each step feeds one token.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model.attribution import Attribution, attribute
from model.memory import Memory


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class GenerationResult:
    text: str = ""
    new_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)
    attribution: list[Attribution] = field(default_factory=list)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (V,) -> token id as a 0-d tensor on the logits' device: greedy at temperature 0, else
    nucleus sampling. Nothing here reads the value on the host (no synchronisation per token)."""
    if temperature <= 0:
        return logits.argmax()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(0) - sorted_probs < top_p).to(probs.dtype)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor, memory: Memory | None, cache, start: int = 0,
            attention_mass: torch.Tensor | None = None) -> torch.Tensor:
    """prompt_ids (1, T) -> logits of the last position (V,), filling the KV cache from `start` (the
    positions already in it, e.g. a persisted document prefix)."""
    input_pos = torch.arange(start, start + prompt_ids.shape[1], device=prompt_ids.device)
    return _forward(model, prompt_ids, input_pos, memory, cache, True, attention_mass)[0, -1]


@torch.no_grad()
def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, memory: Memory | None,
                     cache, attention_mass: torch.Tensor | None = None) -> torch.Tensor:
    """token (1, 1) and input_pos (1,) on the model's device -> logits (V,); with `attention_mass`
    (P,), this step's cross-attention weights on the memory are added to it (citations)."""
    return _forward(model, token, input_pos, memory, cache, False, attention_mass)[0, -1]


def _forward(model, ids: torch.Tensor, input_pos: torch.Tensor, memory: Memory | None, cache,
             last_only: bool = False, attention_mass: torch.Tensor | None = None) -> torch.Tensor:
    """A bare `Transformer` has no memory argument; SharedLLM takes one."""
    if memory is None:
        return model(ids, input_pos, cache=cache, last_only=last_only)
    return model(ids, input_pos, memory=memory, cache=cache, last_only=last_only, attention_mass=attention_mass)


@dataclass
class PrefixState:
    """Persisted self-attention K/V of a prompt's first `length` tokens, per layer (1, nkv, P, hd):
    generation continues from them and prefills only the rest of the prompt."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    # the RoPE position of the prompt's next token, when it is not `length`: a merged cache (HOMER)
    # holds fewer entries than the positions its tokens sat at
    position: int | None = None

    @property
    def length(self) -> int:
        return int(self.k[0].shape[2]) if self.k else 0

    @property
    def next_position(self) -> int:
        return self.length if self.position is None else self.position


def compiled_decode_step(mode: str = "reduce-overhead"):
    """`decode_one_token` under torch.compile (CUDA graphs with "reduce-overhead"): the per-token
    launch overhead of a small batch-1 step is what keeps GPU decoding far below the HBM bound. Needs
    a static cache (`new_cache(..., static=True)`: fixed shapes) and no cross-attention memory."""
    return torch.compile(decode_one_token, mode=mode, dynamic=False)


def sync_interval(device: torch.device) -> int:
    """Tokens decoded between host reads: 1 on CPU (a read costs nothing), 8 on accelerators, where a
    read per token stalls the launch queue (the stop checks run on each batch of 8)."""
    return 1 if device.type == "cpu" else 8


def generate_tokens(model, prompt_ids: Sequence[int], memory: Memory | None, settings: GenerationSettings,
                    eos_ids: Sequence[int] = (), prefix: PrefixState | None = None,
                    on_prefix=None, step_fn=None, attention_mass: torch.Tensor | None = None) -> Iterator[int]:
    """Yields new token ids until EOS (not yielded) or `max_new_tokens`. Owns its KV cache, so
    several generations may run at once on one model (threads share weights, not state).

    `prompt_ids` is the whole prompt; with `prefix`, its first `prefix.length` tokens are taken from
    the persisted states instead of being prefilled. `on_prefix(cache)`, when given, is called after
    the prefill so a caller can persist the states of a prefix. `step_fn` replaces
    `decode_one_token` (a compiled or graphed version; it must use a static cache; it is not given
    `attention_mass`). `attention_mass` (P,) float32, the caller's: the cross-attention mass of every
    decoding step on the memory's positions is added to it (citations; `model.attribution`)."""
    base = model.base if hasattr(model, "base") else model
    device = base.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache = base.new_cache(1, ids.shape[1] + settings.max_new_tokens, static=step_fn is not None)
    start, shift = 0, 0  # prompt index where prefilling starts; RoPE position minus cache index
    if prefix is not None and prefix.length:
        if prefix.length >= ids.shape[1]:
            raise ValueError(f"a prefix of {prefix.length} tokens leaves nothing to prefill of {ids.shape[1]}")
        shift = prefix.next_position - prefix.length
        if shift and step_fn is not None:
            raise ValueError("a compiled decoding step needs a prefix whose positions are its cache indices")
        for layer, k, v in zip(cache, prefix.k, prefix.v, strict=True):
            layer.load_prefix(k.to(device, layer.k.dtype), v.to(device, layer.v.dtype), prefix.next_position)
        start = prefix.length
    step = step_fn or functools.partial(decode_one_token, attention_mass=attention_mass)
    every = sync_interval(device)
    logits = prefill(model, ids[:, start:], memory, cache, start + shift, attention_mass)
    if on_prefix is not None:
        on_prefix(cache)
    input_pos = torch.tensor([ids.shape[1] + shift], device=device)
    pending: list[torch.Tensor] = []
    for n in range(settings.max_new_tokens):
        token = sample(logits, settings.temperature, settings.top_p, generator)
        pending.append(token)
        last = n + 1 == settings.max_new_tokens
        if len(pending) == every or last:
            for tid in torch.stack(pending).tolist():
                if tid in eos_ids:
                    return
                yield tid
            pending.clear()
        if last:
            return
        logits = step(model, token.view(1, 1), input_pos, memory, cache)
        input_pos = input_pos + 1


class TextStream:
    """Iterates decoded text pieces; `result` holds the full answer and timings once exhausted.

    Pieces are emitted only once they are final: an incomplete UTF-8 sequence or a possible
    prefix of a stop string is held back until the next token decides it.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], memory: Memory | None,
                 settings: GenerationSettings, eos_ids: Sequence[int], retrieval_s: float = 0.0,
                 prefix: PrefixState | None = None, on_prefix=None, step_fn=None) -> None:
        self.model, self.tokenizer, self.memory = model, tokenizer, memory
        self.prompt_ids, self.settings, self.eos_ids = prompt_ids, settings, eos_ids
        self.retrieval_s = retrieval_s
        self.prefix, self.on_prefix, self.step_fn = prefix, on_prefix, step_fn
        # this answer's cross-attention per memory position (P,): its own, so one memory can serve
        # several generations at once
        self.attention_mass = torch.zeros(memory.n_positions) if memory is not None else None
        self.result = GenerationResult(prompt_tokens=len(prompt_ids))

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        emitted, tokens, first_at = "", [], None
        finish = "length"
        for token in generate_tokens(self.model, self.prompt_ids, self.memory, self.settings, self.eos_ids,
                                     self.prefix, self.on_prefix, self.step_fn, self.attention_mass):
            first_at = first_at or time.perf_counter()
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _stop_position(text, self.settings.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
                if len(text) > len(emitted):
                    yield text[len(emitted):]
                emitted = text
                break
            ready = _safe_prefix(text, self.settings.stop)
            if len(ready) > len(emitted):
                yield ready[len(emitted):]
                emitted = ready
        else:
            finish = "eos" if len(tokens) < self.settings.max_new_tokens else "length"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(emitted):
                yield text[len(emitted):]
            emitted = text
        end = time.perf_counter()
        decode_s = end - (first_at or end)
        self.result = GenerationResult(
            text=emitted, new_tokens=len(tokens), prompt_tokens=len(self.prompt_ids),
            ttft_s=(first_at or end) - start + self.retrieval_s, total_s=end - start + self.retrieval_s,
            tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
            finish_reason=finish, token_ids=tokens,
            attribution=attribute(self.memory, self.attention_mass) if self.memory is not None else [],
        )


def _stop_position(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """Text that can be shown now: no trailing replacement char, no possible stop-string prefix."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold] if hold else text
