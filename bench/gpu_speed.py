"""`gpu`: sharedllm vs full-attention speed and memory on a CUDA device, 8K-128K tokens.

Two halves, because the GPU machine that measures has none of the app's dependencies and nothing
of this checkout's plotting set-up:

    python -m bench.gpu_speed measure --out results.json [--configs llama-2-7b,llama-3-8b,default]
    python -m bench.gpu_speed report results.json            # here (bench/gpu_report.py): section + plots

`measure` needs only torch and `model/`. Large models use randomly initialised weights of the real
configuration (speed and memory do not depend on weight values; their answers are meaningless and
nothing reads them); `default` is the bundled SmolLM2-135M-Instruct with its real weights. Per
document length and model it records, in one process, pair by pair:

- sharedllm: tree encoding (ingestion tokens/s), TTFT on the already-encoded tree (query vector +
  query-aware search + gather + prefill of the question with cross-attention + first token), decode
  tokens/s with the memory, peak GPU memory of the query;
- full: the whole document plus the question in the prompt, full causal attention over all of it
  (no truncation: what a long-context model pays), TTFT, decode tokens/s and peak GPU memory;
- rag-sized prompt: 4 chunks of L tokens plus the question, the model-side cost of the rag engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.gpu_speed")

# Public configurations (config.json of meta-llama/Llama-2-7b-hf and Meta-Llama-3-8B).
_LLAMA_7B_8B = dict(n_layer=32, n_head=32, dim=4096, head_dim=128, norm_eps=1e-5)
CONFIGS = {
    "llama-2-7b": dict(
        _LLAMA_7B_8B,
        vocab_size=32000,
        n_kv_head=32,
        intermediate_size=11008,
        rope_theta=10000.0,
        max_position=4096,
    ),
    "llama-3-8b": dict(
        _LLAMA_7B_8B,
        vocab_size=128256,
        n_kv_head=8,
        intermediate_size=14336,
        rope_theta=500000.0,
        max_position=8192,
    ),
    "tiny": dict(
        vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, dim=64, intermediate_size=128, head_dim=16
    ),
}
QUESTION_TOKENS = 24
NEW_TOKENS = 32
RAG_CHUNKS = 4


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def random_model(name: str, device: torch.device, dtype: torch.dtype):
    """SharedLLM over a randomly initialised base of a public configuration (default knobs)."""
    from model.config import ModelConfig, SharedLLMConfig
    from model.decoder import Transformer
    from model.sharedllm import SharedLLM

    cfg = ModelConfig(**CONFIGS[name])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built where it runs: a CPU init of 7B parameters takes minutes
            base = Transformer(cfg, attention="sdpa")
            torch.manual_seed(0)  # the same random model in every run
            for p in base.parameters():  # small values keep bf16 activations finite
                torch.nn.init.normal_(p, std=0.02)
            base.inv_freq = base.inv_freq.to(device)
            model = SharedLLM(base, SharedLLMConfig.for_model(cfg)).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, f"{name} (random weights)"


def default_model(device: torch.device, data_dir: str, model: str | None = None):
    """A real checkpoint: a bundled name (needs its packages installed) or a .gguf / HF path."""
    from model.runtime import load_model

    lm = load_model(model, data_dir, device=str(device), dtype="bfloat16")
    return lm.model, f"{lm.name} (real weights)"


def prefill_and_decode(model, prompt: torch.Tensor, memory, new_tokens: int,
                       compiled: bool = False) -> tuple[float, float]:
    """(TTFT of the prompt, decode tokens/s) with a KV cache, greedy; times include syncs. The
    decode loop is the product's: preallocated cache, token and position stay on the device, one
    host read at the end. `compiled`: torch.compile'd step over a static cache (CUDA graphs)."""
    from model.generate import compiled_decode_step, decode_one_token, prefill

    base = model.base
    device = prompt.device
    cache = base.new_cache(1, prompt.shape[1] + new_tokens + 1, static=compiled)
    run_model = model if memory is not None else base
    step = compiled_decode_step() if compiled else decode_one_token
    ttft, logits = _timed(lambda: prefill(run_model, prompt, memory, cache))
    token = logits.argmax().view(1, 1)
    position = torch.tensor([prompt.shape[1]], device=device)
    _sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = step(run_model, token, position, memory, cache)
        token = logits.argmax().view(1, 1)
        position = position + 1
    _sync()
    decode_s = time.perf_counter() - t0
    return ttft, new_tokens / decode_s


def hf_twin(base, dtype: torch.dtype | None = None):
    """transformers' LlamaForCausalLM holding the same weights as our decoder `base` (plain RoPE
    configurations: the random-weight shapes, the tiny test models, SmolLM2), on base's device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = base.config
    ref = base.embed_tokens.weight
    with torch.device(ref.device):
        hf = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=c.vocab_size,
                hidden_size=c.dim,
                intermediate_size=c.intermediate_size,
                num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head,
                num_key_value_heads=c.n_kv_head,
                head_dim=c.head_dim,
                rms_norm_eps=c.norm_eps,
                tie_word_embeddings=c.tie_embeddings,
                max_position_embeddings=max(c.max_position, 131072 + 4096),
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                attn_implementation="sdpa",
            )
        ).to(dtype or ref.dtype)
    state = {
        ("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in base.state_dict().items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


def ours_vs_transformers(model, n_tokens: int, device: torch.device, vocab: int) -> dict:
    """Our decoder against transformers' `generate` on the same weights and prompt, greedy, no
    memory: TTFT, decode tokens/s and how many of the generated tokens agree."""
    prompt = torch.randint(100, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1)).to(device)
    ours = [prefill_and_decode(model, prompt, None, NEW_TOKENS) for _ in range(2)][-1]
    ours_tokens = _greedy_tokens(model.base, prompt, NEW_TOKENS)
    hf = hf_twin(model.base)
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        hf.generate(prompt, max_new_tokens=2, **kwargs)  # warm-up
        ttft, _ = _timed(lambda: hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs))
        total, out = _timed(
            lambda: hf.generate(
                prompt, max_new_tokens=NEW_TOKENS + 1, min_new_tokens=NEW_TOKENS + 1, **kwargs
            )
        )
    hf_tokens = out[0, n_tokens:].tolist()
    agree = next(
        (i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b),
        min(len(ours_tokens), len(hf_tokens)),
    )
    hf = None  # freed before the next model is built
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "prompt_tokens": n_tokens,
        "ours_ttft_s": ours[0],
        "ours_decode_tok_s": ours[1],
        "hf_ttft_s": ttft,
        "hf_decode_tok_s": NEW_TOKENS / max(total - ttft, 1e-9),
        "greedy_tokens_agree": agree,
        "compared_tokens": min(len(ours_tokens), len(hf_tokens)),
    }


def decode_speed(model, device: torch.device, vocab: int, compiled: bool, prompt_tokens: int = 1024) -> dict:
    """Batch-1 decode tokens/s after a `prompt_tokens` prompt, eager and (optionally) compiled, next
    to the memory-bandwidth bound: each token must read every weight once (plus the KV cache)."""
    prompt = torch.randint(100, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(2)).to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.base.parameters())
    out = {"prompt_tokens": prompt_tokens, "weight_bytes": weight_bytes,
           "eager_tok_s": [prefill_and_decode(model, prompt, None, NEW_TOKENS) for _ in range(2)][-1][1]}
    if compiled:
        prefill_and_decode(model, prompt, None, 8, compiled=True)  # compile + graph capture
        out["compiled_tok_s"] = prefill_and_decode(model, prompt, None, NEW_TOKENS, compiled=True)[1]
    return out


def _greedy_tokens(base, prompt: torch.Tensor, n: int) -> list[int]:
    from model.generate import GenerationSettings, generate_tokens

    return list(generate_tokens(base, prompt[0].tolist(), None, GenerationSettings(max_new_tokens=n)))


def measure_length(model, n_tokens: int, device: torch.device, vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    doc = torch.randint(100, vocab, (n_tokens,), generator=gen)
    question = torch.randint(100, vocab, (QUESTION_TOKENS,), generator=gen)
    row: dict = {"tokens": n_tokens}
    # sharedllm: ingestion, then queries on the stored tree
    encode_s, tree = _timed(lambda: model.encode_tree(doc))
    row["sharedllm_encode_s"] = encode_s
    row["sharedllm_encode_tok_s"] = n_tokens / encode_s
    row["tree_bytes_per_token"] = tree.nbytes() / n_tokens
    for where in ("ram", "gpu"):
        if where == "gpu" and device.type != "cuda":
            continue
        t = tree if where == "ram" else tree.kv_to(device)  # moved only now: the RAM peak excludes it
        _peak_reset()
        ttfts, retrievals, decode, memory = [], [], None, None
        for _ in range(3):

            def query(t=t):
                return model.build_memory([t], model.query_vector(question))

            retrieval_s, memory = _timed(query)
            ttft, decode = prefill_and_decode(model, question[None].to(device), memory, NEW_TOKENS)
            ttfts.append(retrieval_s + ttft)
            retrievals.append(retrieval_s)
        row["memory_positions"] = memory.n_positions
        row[f"memory_checksum_{where}"] = float(
            memory.keys.double().square().sum()
        )  # both paths: the same memory
        row[f"sharedllm_{where}_search_gather_s"] = statistics.median(retrievals)
        row[f"sharedllm_{where}_ttft_s"] = statistics.median(ttfts)
        row[f"sharedllm_{where}_decode_tok_s"] = decode
        row[f"sharedllm_{where}_peak_gib"] = _peak_gib()
        del memory, t
    del tree
    # rag-sized prompt: 4 chunks + question
    rag_prompt = torch.cat([doc[: RAG_CHUNKS * model.config.chunk_len], question])[None].to(device)
    rag = [prefill_and_decode(model, rag_prompt, None, NEW_TOKENS) for _ in range(2)][-1]
    row["rag_prompt_tokens"] = rag_prompt.shape[1]
    row["rag_ttft_s"], row["rag_decode_tok_s"] = rag
    # full: everything in the prompt
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    _peak_reset()
    full_prompt = torch.cat([doc, question])[None].to(device)
    try:
        repeats = 2 if n_tokens <= 32768 else 1
        results = [prefill_and_decode(model, full_prompt, None, NEW_TOKENS) for _ in range(repeats)]
        row["full_ttft_s"], row["full_decode_tok_s"] = min(r[0] for r in results), results[-1][1]
        row["full_peak_gib"] = _peak_gib()
    except torch.OutOfMemoryError as exc:  # reported, not hidden
        row["full_error"] = f"out of memory: {str(exc).splitlines()[0]}"
    del full_prompt
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for where in ("ram", "gpu"):
        if row.get("full_ttft_s") and row.get(f"sharedllm_{where}_ttft_s"):
            row[f"ttft_speedup_{where}"] = row["full_ttft_s"] / row[f"sharedllm_{where}_ttft_s"]
    log.info("%s", json.dumps(row))
    return row


def measure(args: argparse.Namespace) -> int:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    out = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "dtype": str(dtype).replace("torch.", ""),
        "command": "python -m bench.gpu_speed measure " + " ".join(sys.argv[2:]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "models": [],
    }
    path = Path(args.out)
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        model, label = (
            default_model(device, args.data_dir, args.model) if name == "default"
            else random_model(name, device, dtype)
        )
        entry = {
            "name": name,
            "label": label,
            "load_s": time.perf_counter() - t0,
            "attention": model.base.attention_backend,
            "n_inject_layers": model.config.n_inject_layers,
            "chunk_len": model.config.chunk_len,
            "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
            "rows": [],
        }
        out["models"].append(entry)
        measure_length(model, min(lengths), device, model.base.config.vocab_size, seed=0)  # warm-up
        for n in lengths:
            entry["rows"].append(measure_length(model, n, device, model.base.config.vocab_size, seed=n))
            path.write_text(json.dumps(out, indent=1))  # what was measured survives a timeout
        entry["decode"] = decode_speed(model, device, model.base.config.vocab_size, args.compile)
        path.write_text(json.dumps(out, indent=1))
        if args.vs_transformers:
            entry["vs_transformers"] = [
                ours_vs_transformers(model, n, device, model.base.config.vocab_size)
                for n in (int(x) for x in args.vs_transformers.split(","))
            ]
            path.write_text(json.dumps(out, indent=1))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    path.write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--configs", default="llama-2-7b,llama-3-8b")
    m.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    m.add_argument("--device", default="auto")
    m.add_argument("--data-dir", default="data")
    m.add_argument("--model", default=None,
                   help="the `default` config's checkpoint: bundled name or a .gguf / HF directory path")
    m.add_argument("--compile", action="store_true",
                   help="decode with torch.compile (reduce-overhead: CUDA graphs) over a static cache")
    m.add_argument(
        "--vs-transformers", default="", help="prompt lengths for ours vs transformers' generate, e.g. 4096"
    )
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+", help="JSON files written by `measure` (one section for all)")
    r.add_argument("--md", default="docs/benchmarks.md")
    r.add_argument("--raw-dir", default="bench/results")
    r.add_argument("--hbm-gbs", type=float, default=4800.0,
                   help="the GPU's memory bandwidth in GB/s for the decode bound (H200: 4800, H100 SXM: 3350)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "measure":
        return measure(args)
    from bench.gpu_report import report  # plotting and docs: this checkout only

    return report(args)


if __name__ == "__main__":
    sys.exit(main())
