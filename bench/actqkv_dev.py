"""ActQKV's development probe: needle documents of several lengths, each encoded once (and kept in
`--state-dir` for later runs), answered with several question-time knob settings.

    python -m bench.actqkv_dev --data-dir build/test-data --lengths 8192,12288,16384 \\
        --variants '[{"lexical_blocks": 0}, {"lexical_blocks": 4}]' --state-dir build/actqkv-dev

Each variant is a dict of `ActQKVConfig` fields that do not change the encoding (`lexical_blocks`,
`probe`, `retrieval_interval`; others would need their own states and are refused). The documents
are the needle grid's (bench/actqkv_bench.py: one needle per depth, each for its own noun). Prints one
line per (length, variant, question) and a total per variant; the figures in docs/benchmarks.md,
*actqkv-lexical-dev*, come from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from app.services.engines import get_engine
    from app.services.prompt_layout import document_stream
    from bench.actqkv_bench import answer, needle_document
    from bench.common import ModelChoice, document_context, kept_state, split_pages
    from bench.evalset import contains_match
    from model.block_state import BlockState

    parser = argparse.ArgumentParser(prog="python -m bench.actqkv_dev")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--variants", default='[{}]')
    parser.add_argument("--state-dir", type=Path, default=None, help="keep the encoded states here for later runs")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model with the real tokenizer (tests the probe in seconds)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lm = ModelChoice(tiny=args.tiny, data_dir=Path(args.data_dir), device="auto").load()
    variants = json.loads(args.variants)
    for v in variants:
        changed = {k for k in v if dataclasses.replace(lm.actqkv, **{k: v[k]}).fingerprint("", "") !=
                   lm.actqkv.fingerprint("", "")}
        if changed:
            raise SystemExit(f"{sorted(changed)} change the encoding: give them their own run")
    engine = get_engine("actqkv")
    totals = {json.dumps(v): [0, 0] for v in variants}
    for n in [int(x) for x in args.lengths.split(",")]:
        text, items = needle_document(lm, n, [float(d) for d in args.depths.split(",")])
        doc, _ = document_context(lm, split_pages(text), "haystack", with_tree=False)
        path = args.state_dir / f"{lm.actqkv_fingerprint('needles')}-{n}.safetensors" if args.state_dir else None
        state = kept_state(path, lambda doc=doc: lm.encode_blocks(*document_stream(lm, doc)),
                           lambda t: BlockState.from_tensors(t, lm.actqkv), f"{n}: {len(doc.token_ids)} tokens")
        for v in variants:
            doc.extra["actqkv"] = dataclasses.replace(state, config=dataclasses.replace(lm.actqkv, **v))
            right = 0
            for item in items:
                out = answer(lm, engine, item.question, doc, args.max_new_tokens)
                ok = bool(contains_match(out["answer"], item.answer))
                right += ok
                print(f"{n} {v} depth {item.depth}: {'right' if ok else 'wrong'} ({item.answer}): "
                      f"{out['answer'][:90]!r}", flush=True)
            totals[json.dumps(v)][0] += right
            totals[json.dumps(v)][1] += len(items)
            print(f"{n} {v}: {right}/{len(items)}", flush=True)
    for v, (right, total) in totals.items():
        print(f"total {v}: {right}/{total}", flush=True)


if __name__ == "__main__":
    main()
