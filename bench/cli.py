"""`python -m bench` / `sharedllm bench`: quality and speed of the three engines on the same work.

    python -m bench speed   [--lengths 4096,16384] [--long]      # per engine: ingest, TTFT, decode, RSS, disk
    python -m bench model   [--lengths 4096]                     # engine level: encode, search+gather, ours vs HF
    python -m bench ingest  [--pdf nettle-manual]                # real PDF, time split, bytes per token
    python -m bench quality [--needle-lengths ...] [--qa-pdfs ...]  # needle grid, real-PDF QA, perplexity
    python -m bench base    [--models qwen2.5-0.5b,smollm2]      # reading, decoder vs HF, full's prompt cache
    python -m bench decode  [--lengths 4096,16384]               # KV-cache layout / decode attention, before vs now
    python -m bench actqkv  [--lengths 4k,16k,32k,64k,128k]      # needle grid + speed vs length: actqkv, full, rag
    python -m bench homer   [--lengths 4k,16k,32k,64k]           # the same grid with homer; peak memory vs length
    python -m bench smoke                                        # all of the above, tiny model, seconds
    python -m bench all                                          # speed, model, ingest, quality

Common options: --weights DIR / --init-mode copy|zero (trained vs copy-init vs zero-init),
--model PATH, --data-dir DIR (model cache), --out FILE.md, --img-dir DIR.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = ("speed", "model", "ingest", "quality")
DEFAULT_ENGINES = "sharedllm,full,rag"
EXTRA_BENCHMARKS = ("base", "decode", "actqkv", "homer")  # not part of `all`: long (base loads every bundled model)


def _ints(text: str) -> list[int]:
    return [int(float(x.lower().replace("k", "")) * (1024 if "k" in x.lower() else 1)) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=(*BENCHMARKS, *EXTRA_BENCHMARKS, "smoke", "all"))
    parser.add_argument("--data-dir", type=Path, default=None, help="model cache (default ./data or SHAREDLLM_DATA_DIR)")
    parser.add_argument("--model", default=None,
                        help="bundled model name (qwen2.5-0.5b, the default; smollm2), checkpoint directory or .gguf")
    parser.add_argument("--weights", default=None, help="SharedLLM weights directory (default: assets/, if trained)")
    parser.add_argument("--init-mode", choices=("copy", "zero"), default=None,
                        help="initialisation of untrained cross-attention (ignored with --weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (what `smoke` uses)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="Markdown file")
    parser.add_argument("--img-dir", type=Path, default=None, help="plots (default: img/ next to --out)")
    parser.add_argument("--raw-dir", type=Path, default=None, help="raw JSON (default: bench/results or --out's dir)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch space for app data (default: /tmp)")
    parser.add_argument("--store-dir", type=Path, default=None,
                        help="ingest/quality: keep the app store here (a later run reuses ingested documents)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--suffix", default="", help="appended to section keys and figure names")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    # speed
    parser.add_argument("--lengths", type=_ints, default=None, help="document tokens, e.g. 4k,16k,64k")
    parser.add_argument("--long", action="store_true", help="speed: add 128K tokens")
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help="default for actqkv: actqkv,full,rag")
    parser.add_argument("--questions", type=int, default=1, help="speed: questions per document")
    parser.add_argument("--tiled-lengths", type=_ints, default=None,
                        help="model: search+gather and TTFT on trees tiled to these lengths")
    # base
    parser.add_argument("--models", default="qwen2.5-0.5b,smollm2", help="base: bundled models compared")
    parser.add_argument("--reading-items", type=int, default=12, help="base: real-PDF reading questions")
    parser.add_argument("--cache-lengths", type=_ints, default=None, help="base: documents for full's prompt cache (0: none)")
    # ingest
    parser.add_argument("--pdf", default="nettle-manual", help="ingest: a PDF id of bench/data/real_pdfs.json")
    parser.add_argument("--no-ask", action="store_true", help="ingest: skip the per-engine question")
    # quality
    parser.add_argument("--needle-lengths", type=_ints, default=None)
    parser.add_argument("--depths", type=_floats, default=None)
    parser.add_argument("--single-needle", action="store_true",
                        help="actqkv/homer: one document per depth holding its needle alone (default: one "
                             "document per length with every depth's needle)")
    parser.add_argument("--replicates", type=_ints, default=None,
                        help="actqkv/homer: which draws of the needle documents, e.g. 0,1,2 (default 0: the "
                             "documents of every earlier run); several give each cell several samples")
    parser.add_argument("--qa-pdfs", default=None, help="quality: comma-separated PDF ids (default: all available)")
    parser.add_argument("--qa-limit", type=int, default=None, help="quality: at most N questions per PDF")
    parser.add_argument("--ppl-lengths", type=_ints, default=None)
    parser.add_argument("--actqkv", default=None, help="JSON of ActQKV knobs (as SHAREDLLM_ACTQKV)")
    parser.add_argument("--homer", default=None, help="JSON of HOMER knobs (as SHAREDLLM_HOMER)")
    parser.add_argument("--skip", default="", help="quality: parts to skip (needle,qa,multi,ppl)")
    parser.add_argument("-v", "--verbose", action="store_true")


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def make_run(args: argparse.Namespace, command: str):
    import os

    from bench.common import ModelChoice
    from bench.run import Run

    smoke = args.benchmark == "smoke"
    if smoke and args.threads is None:
        args.threads = 1  # a tiny model on a shared CPU: one thread avoids OpenMP contention
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path(os.environ.get("SHAREDLLM_DATA_DIR", "data"))
    choice = ModelChoice(model_path=args.model, weights=args.weights, init_mode=args.init_mode,
                         tiny=args.tiny or smoke, data_dir=data_dir, device=args.device)
    lm = choice.load()
    if args.actqkv or args.homer:  # engine knobs, read as the app reads SHAREDLLM_ACTQKV / SHAREDLLM_HOMER
        from app.config import Settings

        knobs = Settings.load({"actqkv": args.actqkv, "homer": args.homer}, environ={})
        lm.actqkv, lm.homer = knobs.actqkv_config(), knobs.homer_config()
    img_dir = args.img_dir or args.out.parent / "img"
    raw_dir = args.raw_dir or (REPO / "bench" / "results" if args.out.resolve() == (REPO / "docs" / "benchmarks.md")
                               else args.out.parent / "results")
    suffix = args.suffix or ("-smoke" if smoke else "")
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    if smoke and args.store_dir is None:  # ingest and quality share one store: the PDF is encoded once
        args.store_dir = Path(tempfile.mkdtemp(prefix="sharedllm-bench-smoke-", dir=args.work_dir))
        args.remove_store = True
    if smoke and args.max_new_tokens == 16:
        args.max_new_tokens = 4
    return Run(lm=lm, command=command, md_path=args.out, img_dir=img_dir, raw_dir=raw_dir, work_dir=args.work_dir, store_dir=args.store_dir,
               key_suffix=suffix, max_new_tokens=args.max_new_tokens)


def run_benchmarks(args: argparse.Namespace, command: str) -> list:
    run = make_run(args, command)
    smoke = args.benchmark == "smoke"
    todo = BENCHMARKS if args.benchmark in ("all", "smoke") else (args.benchmark,)
    engines = tuple(e for e in args.engines.split(",") if e)
    sections = []
    for name in todo:
        t0 = time.perf_counter()
        log.info("benchmark %s: starting", name)
        if name == "speed":
            from bench import speed

            lengths = args.lengths or ([256, 512] if smoke else [4096, 16384, 65536])
            if args.long:
                lengths = sorted(set(lengths) | {131072})
            sections.append(speed.run_speed(run, lengths, engines, args.questions))
        elif name == "model":
            from bench import model_bench

            lengths = args.lengths or ([256] if smoke else [4096])
            tiled = args.tiled_lengths or ([1024, 4096] if smoke else [4096, 16384, 65536, 131072])
            sections.append(model_bench.run_model(run, lengths, tiled, prompt_tokens=64 if smoke else 1024,
                                                  data_dir=args.data_dir or Path("data"), model_path=args.model))
        elif name == "ingest":
            from bench import ingest

            pdf = args.pdf if not (smoke and args.pdf == "nettle-manual") else "fontconfig-user"
            asked = tuple(e for e in engines if e != "full") if smoke else engines  # smoke: full runs in quality
            sections.append(ingest.run_ingest(run, pdf, asked, ask=not args.no_ask))
        elif name == "quality":
            from bench import quality

            skip = set(filter(None, args.skip.split(",")))
            qa_pdfs = args.qa_pdfs.split(",") if args.qa_pdfs else (["fontconfig-user"] if smoke else None)
            sections.append(quality.run_quality(
                run, engines,
                needle_lengths=args.needle_lengths or ([256] if smoke else [1024, 2048, 4096]),
                depths=args.depths or ([0.5] if smoke else [0.1, 0.5, 0.9]),
                qa_pdfs=qa_pdfs, qa_limit=args.qa_limit or (1 if smoke else None),
                ppl_lengths=args.ppl_lengths or ([256] if smoke else [2048, 8192]),
                skip=skip))
        elif name == "base":
            from bench import base_model

            sections.append(base_model.run_base(
                run, [m for m in args.models.split(",") if m], 2 if smoke else args.reading_items,
                [n for n in (args.cache_lengths if args.cache_lengths is not None else ([600] if smoke else [5120, 30720]))
                 if n > 0],  # --cache-lengths 0: no prompt-cache rows
                args.data_dir or Path("data")))
        elif name == "actqkv":
            from bench import actqkv_bench

            compared = ("actqkv", "full", "rag") if args.engines == DEFAULT_ENGINES else engines
            sections.append(actqkv_bench.run_actqkv(
                run, args.lengths or ([300] if smoke else [4096, 16384, 32768, 65536, 131072]),
                args.depths or ([0.5] if smoke else [0.1, 0.5, 0.9]), compared,
                args.tiled_lengths or ([600, 2400] if smoke else [4096, 16384, 32768, 65536, 131072]),
                single_needle=args.single_needle, replicates=args.replicates))
        elif name == "homer":
            from bench import actqkv_bench

            compared = ("homer", "actqkv", "full", "rag") if args.engines == DEFAULT_ENGINES else engines
            sections.append(actqkv_bench.run_actqkv(
                run, args.lengths or ([300] if smoke else [4096, 16384, 32768, 65536]),
                args.depths or ([0.5] if smoke else [0.1, 0.5, 0.9]), compared, None, key="homer",
                single_needle=args.single_needle, replicates=args.replicates))
        elif name == "decode":
            from bench import decode_layout

            sections.append(decode_layout.run_decode(run, args.lengths or ([256] if smoke else [4096, 16384])))
        log.info("benchmark %s: done in %.0f s", name, time.perf_counter() - t0)
    if getattr(args, "remove_store", False):
        shutil.rmtree(args.store_dir, ignore_errors=True)
    return sections


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "bm25s", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = " ".join([prog, *map(shlex.quote, argv)])
    sections = run_benchmarks(args, command)
    for s in sections:
        print(f"{s.key}: {s.wall_s:.0f} s -> {args.out}")
    return 0
