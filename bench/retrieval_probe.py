"""Does the query-aware policy descend into the node that holds the evidence?

For every real-PDF question (bench/data/real_qa.jsonl) whose evidence lies in a full 512-token
chunk, encode that chunk's level-1 and level-2 candidate nodes with the lower model's first layer
(exactly the retrieval vectors the tree stores) and check whether cosine similarity with the query
vector picks the child that contains the evidence, for both vector kinds:
`last` (the paper: hidden state at the last token) and `mean` (mean over the node's tokens).
Chance: 50% per level, 25% for both. Independent of the cross-attention weights.

    python -m bench.retrieval_probe [--items 80]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.evalset import document_text, evidence_offset, load_real_qa
from model import load_model
from model.search import cosine
from model.tree import node_vector


def layer1_states(lm, ids: list[int]) -> torch.Tensor:
    base = lm.model.base
    x = base.embed_tokens(torch.tensor([ids], device=lm.device))
    cos, sin = base.rope(torch.arange(len(ids), device=lm.device), x.dtype)
    return base.layers[0](x, cos, sin, base.attn_fn)[0]


@torch.no_grad()
def probe(lm, max_items: int) -> dict:
    chunk_len = lm.config.chunk_len
    half, quarter = chunk_len // 2, chunk_len // 4
    hits = {mode: [0, 0, 0] for mode in ("last", "mean")}
    n = 0
    for item in load_real_qa(available_only=True)[:max_items]:
        text, offset = document_text(item.pdf), evidence_offset(item)
        if text is None or offset is None:
            continue
        at = len(lm.tokenize(text[:offset]))
        ids = lm.tokenize(text)
        c = at // chunk_len
        chunk, pos = ids[c * chunk_len : (c + 1) * chunk_len], at - c * chunk_len
        if len(chunk) < chunk_len:
            continue
        n += 1
        question = layer1_states(lm, lm.tokenize(item.question))
        want1 = pos // half
        start2 = want1 * half
        want2 = (pos - start2) // quarter
        for mode, counts in hits.items():
            q = node_vector(question, question.shape[0], mode)
            level1 = torch.stack(
                [node_vector(layer1_states(lm, chunk[s : s + half]), half, mode) for s in (0, half)]
            )
            level2 = torch.stack(
                [
                    node_vector(layer1_states(lm, chunk[start2 + s : start2 + s + quarter]), quarter, mode)
                    for s in (0, quarter)
                ]
            )
            ok1 = int(cosine(q, level1).argmax()) == want1
            ok2 = int(cosine(q, level2).argmax()) == want2
            counts[0] += ok1
            counts[1] += ok2
            counts[2] += ok1 and ok2
    return {
        "questions": n,
        **{mode: {"level1": c[0] / n, "level2": c[1] / n, "both": c[2] / n} for mode, c in hits.items()},
        "chance": {"level1": 0.5, "level2": 0.5, "both": 0.25},
    }


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys
    import time
    from pathlib import Path

    from bench.common import load_average, machine_label
    from bench.report import Section, Table, write_section

    parser = argparse.ArgumentParser(prog="python -m bench.retrieval_probe", description=__doc__)
    parser.add_argument("--items", type=int, default=80)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md",
        help="Markdown file whose 'retrieval-probe' section is rewritten ('' to only print)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    when = time.strftime("%Y-%m-%d %H:%M") + f", load average {load_average()}"
    lm = load_model(data_dir=args.data_dir, device="cpu")
    result = probe(lm, args.items)
    print(json.dumps(result, indent=2))
    if str(args.out):
        argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        section = Section(
            key="retrieval-probe",
            title="Retrieval probe: does the search descend into the evidence?",
            machine=machine_label(lm.device),
            command=f"python -m bench.retrieval_probe {argv_text}".strip(),
            weights=f"{lm.name} layer 1 (independent of the cross-attention weights)",
            started=when,
        )
        rows = [
            [mode, result[mode]["level1"], result[mode]["level2"], result[mode]["both"]]
            for mode in ("last", "mean")
        ]
        rows.append(["chance", 0.5, 0.5, 0.25])
        section.tables.append(
            Table(
                ["retrieval vector", "level 1 (halves)", "level 2 (quarters)", "both levels"],
                rows,
                title=f"share of {result['questions']} real-PDF questions (evidence in a full chunk) "
                "whose evidence child is selected",
            )
        )
        section.notes.append(
            "`last` is the paper's vector (hidden state after layer 1 at the last token); a question's "
            "last token is usually '?' and a node's is arbitrary, so the comparison carries little "
            "content. `mean` averages the node's (question's) layer-1 states, i.e. a bag of its "
            "contextual token embeddings."
        )
        section.wall_s = time.perf_counter() - started
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
