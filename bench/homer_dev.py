"""HOMER's development probe: one needle document, several knob settings, and for each question
whether the needle's digits and its sentence survived the reductions (not only the answer).

    python -m bench.homer_dev --data-dir build/test-data --length 8192 --chunk 3072 \\
        --variants '[{"keep_window": 0}, {"keep_window": 2}]' [--single-needle]

Each variant is a dict of `HomerConfig` fields (plus `"bias": false` to switch the calibration off);
the document's leaves are encoded once and shared (the variants change question-time knobs only).
`--single-needle`: one document per depth holding its needle alone (what the merge finds, apart from
telling similar needles apart). `--state-dir` keeps the encoded leaves (64K tokens: ~20 minutes of
CPU to encode) for later runs on the same document.
Prints one line per (variant, question); the figures in docs/benchmarks.md, *homer-dev*, come from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _find(ids: list[int], sub: list[int]) -> int:
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return i
    return -1


def main(argv: list[str] | None = None) -> None:
    from bench.common import ModelChoice
    from model.homer import HomerConfig

    parser = argparse.ArgumentParser(prog="python -m bench.homer_dev")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=3072)
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--variants", default='[{}]')
    parser.add_argument("--single-needle", action="store_true",
                        help="one document per depth holding its needle alone (default: one document, every depth)")
    parser.add_argument("--replicate", type=int, default=0,
                        help="which draw of the needle documents (as the bench's --replicates)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="keep the encoded leaves here: a later run on the same document skips the encoding")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model with the real tokenizer (tests the probe in seconds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = ModelChoice(tiny=args.tiny, data_dir=Path(args.data_dir), device="auto").load()
    lm.homer = HomerConfig(chunk_tokens=args.chunk)
    bias = lm.calibrate_homer()
    depths = [float(d) for d in args.depths.split(",")]
    for doc_depths in ([[d] for d in depths] if args.single_needle else [depths]):
        _probe(lm, bias, args, doc_depths)


def _probe(lm, bias, args, depths: list[float]) -> None:
    """One needle document (a needle per depth) encoded once, answered under every variant."""
    from app.services.engines import get_engine
    from app.services.prompt_layout import homer_stream
    from bench.actqkv_bench import needle_document
    from bench.common import document_context, kept_state, split_pages
    from bench.evalset import contains_match
    from model import GenerationSettings
    from model.homer import HomerConfig
    from model.homer_state import HomerState

    lm.homer = HomerConfig(chunk_tokens=args.chunk)  # the encoding's knobs, not the last variant's
    text, items = needle_document(lm, args.length, depths, args.replicate)
    doc, _ = document_context(lm, split_pages(text), "haystack", with_tree=False)
    name = f"{lm.homer_fingerprint('needles')}-{args.length}-{','.join(map(str, depths))}-r{args.replicate}"
    path = args.state_dir / f"{name}.safetensors" if args.state_dir else None
    state = kept_state(path, lambda: lm.encode_homer(*homer_stream(lm, doc)),
                       lambda t: HomerState.from_tensors(t, lm.homer_config()), "leaves")
    doc.extra["homer"] = state
    print(f"{len(state.token_ids)} tokens in {len(state.ranges)} leaves of {state.piece}", flush=True)
    engine = get_engine("homer")
    for variant in json.loads(args.variants):
        lm.homer = HomerConfig(chunk_tokens=args.chunk, **{k: v for k, v in variant.items() if k != "bias"})
        lm.homer_bias = bias if variant.get("bias", True) else torch.zeros(lm.model.base.config.n_layer, 1)
        right = 0
        for item in items:
            digits = lm.tokenize(item.answer)
            at = _find(state.token_ids, digits)
            prepared = engine.prepare(lm, item.question, [doc], [])
            kept = set(prepared.memory.tok[prepared.memory.doc >= 0].tolist())
            sentence = range(max(0, at - 25), at + len(digits))
            stream = lm.generate(prepared.messages, prepared.memory, GenerationSettings(max_new_tokens=24),
                                 prompt_ids=prepared.prompt_ids, prefix=prepared.prefix)
            answer = "".join(stream)
            ok = bool(contains_match(answer, item.answer))
            right += ok
            print(f"{variant} depth {item.depth}: digits kept {sum(i in kept for i in range(at, at + len(digits)))}"
                  f"/{len(digits)}, needle sentence kept {sum(i in kept for i in sentence)}/{len(sentence)}, "
                  f"{'right' if ok else 'wrong'}: {answer[-16:]!r}", flush=True)
        print(f"{variant}: {right}/{len(items)}", flush=True)


if __name__ == "__main__":
    main()
