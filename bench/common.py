"""Shared pieces of the benchmarks: the machine label, peak-RSS probes, model loading, documents
built from real text (as PDFs for the full ingestion path, or as in-memory `DocumentContext`s for
engine-level runs), and a stage timer for ingestion.

Every figure the benchmarks write carries the machine (`machine_label`) and the exact command.
Ratios are only ever computed between measurements taken in the same process, back to back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


# --- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown CPU"


def machine_label(device: torch.device | str = "cpu") -> str:
    """One line naming the hardware a figure was measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = os.cpu_count() or 0
    return f"{cpu_model()}, {cores} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}"


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# --- memory --------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else float("nan")


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Measures the peak RSS (and peak CUDA memory) of the block: yields a dict filled on exit."""
    out: dict[str, float] = {}
    reset_peak_rss()
    out["rss_before_mb"] = rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        out["peak_rss_mb"] = peak_rss_mb()
        if torch.cuda.is_available():
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20


# --- model ---------------------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """Which model and cross-attention weights a run uses (the `--weights/--init-mode/--tiny` flags)."""

    model_path: str | None = None
    weights: str | None = None
    init_mode: str | None = None
    tiny: bool = False
    data_dir: Path = Path("data")
    device: str = "cpu"

    def load(self) -> Any:
        if self.tiny:
            from model.testing import tiny_loaded_model

            overrides = {"init_mode": self.init_mode} if self.init_mode else {}
            return tiny_loaded_model(self.data_dir, **overrides)
        from model import load_model

        overrides = {"init_mode": self.init_mode} if self.init_mode and not self.weights else {}
        return load_model(self.model_path, data_dir=self.data_dir, device=self.device, weights=self.weights,
                          **overrides)


def weights_label(lm: Any) -> str:
    """Says which cross-attention weights a figure used (trained, or which untrained init)."""
    if getattr(lm, "weights_trained", False):
        return "trained SharedLLM weights"
    return f"untrained cross-attention ({lm.config.init_mode} init)"


def model_label(lm: Any) -> str:
    cfg = lm.config
    return (f"{lm.name} (M={cfg.n_inject_layers}, L={cfg.chunk_len}, h={cfg.tree_height}, "
            f"tree {cfg.tree_dtype}, {weights_label(lm)})")


# --- documents from real text ----------------------------------------------------------------------
def text_of_tokens(lm: Any, n_tokens: int, seed: int = 0) -> str:
    """Real English text (Python's documentation) of about `n_tokens` tokens of `lm`'s tokenizer."""
    from bench.evalset import haystack_text

    text = haystack_text(int(n_tokens * 4.5) + 2000, seed=seed)
    ids = lm.tokenize(text)
    while len(ids) < n_tokens:  # denser text than expected: ask for more
        text = haystack_text(int(len(text) * 1.5), seed=seed)
        ids = lm.tokenize(text)
    return lm.tokenizer.decode(ids[:n_tokens])


def write_pdf(text: str, path: Path, chars_per_page: int = 3000) -> Path:
    """A plain text PDF (core Helvetica, so latin-1 only) of `text`, about `chars_per_page` a page."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.set_font("Helvetica", size=9)
    safe = text.encode("latin-1", "replace").decode("latin-1")
    for start in range(0, len(safe), chars_per_page):
        pdf.add_page()
        pdf.multi_cell(0, 4, safe[start:start + chars_per_page])
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))
    return path


def split_pages(text: str, chars_per_page: int = 3000) -> list[str]:
    """Cuts text into page-sized pieces at whitespace."""
    pages, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars_per_page)
        if end < len(text):
            space = text.rfind(" ", start + chars_per_page // 2, end)
            end = space if space > start else end
        pages.append(text[start:end].strip())
        start = end
    return [p for p in pages if p]


def document_context(lm: Any, pages: list[str], name: str = "document", with_tree: bool = True,
                     doc_id: int = 0) -> tuple[Any, dict[str, float]]:
    """An in-memory `DocumentContext` built like ingestion builds one (same tokenisation by page, same
    chunk rows), with its context tree when `with_tree`. Returns it and the seconds per stage."""
    from app.ingestion import chunk_rows, tokenize_pages
    from app.services.documents import DocumentContext, PageSpan

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenized = tokenize_pages(lm.tokenizer, pages)
    times["tokenize_s"] = time.perf_counter() - t0
    rows = chunk_rows(doc_id, tokenized, lm.config.chunk_len, lm.tokenizer.decode)
    chunks = [{"index": r.index, "token_start": r.token_start, "token_end": r.token_end,
               "page_start": r.page_start, "page_end": r.page_end, "text": r.text} for r in rows]
    spans = [PageSpan(n, s, e, t) for n, (t, (s, e)) in enumerate(zip(pages, tokenized.page_spans), 1)]
    doc = DocumentContext(doc_id, name, spans, chunks, token_ids=tokenized.token_ids)
    if with_tree:
        t0 = time.perf_counter()
        doc.tree = lm.encode_tree(tokenized.token_ids)
        times["encode_s"] = time.perf_counter() - t0
    times["tokens"] = len(tokenized.token_ids)
    return doc, times


# --- ingestion stage timer -------------------------------------------------------------------------
@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    extract_child_peak_rss_mb: float = 0.0


@contextlib.contextmanager
def timed_ingestion(ctx: Any) -> Iterator[StageTimes]:
    """Times IngestionService's stages from outside: wraps `extract_pdf` and `tokenize_pages` in
    `app.ingestion`, the model's `encode_tree`, the tensor store's `save` (the "write" stage: the
    tree) and the QA service's `warm_prompt_cache` (the "prompt" stage: `full`'s prompt prefix,
    prefill and its own write). Whatever else ingestion does (hashing the upload, database rows) is
    `total - sum(stages)`."""
    from app import ingestion

    times = StageTimes()
    lm = ctx.model()
    originals = (ingestion.extract_pdf, ingestion.tokenize_pages, lm.encode_tree, ctx.tensors.save,
                 ctx.qa.warm_prompt_cache)
    inside: list[str] = []  # the stage running now: a save inside "prompt" is not a tree write

    def timed(stage: str, fn):
        def wrapper(*args, **kwargs):
            if stage == "write" and "prompt" in inside:
                return fn(*args, **kwargs)
            inside.append(stage)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times.seconds[stage] += time.perf_counter() - t0
                inside.pop()
        return wrapper

    def extract(*args, **kwargs):
        result = timed("extract", originals[0])(*args, **kwargs)
        times.extract_child_peak_rss_mb = max(times.extract_child_peak_rss_mb, result.peak_rss_bytes / 2**20)
        return result

    ingestion.extract_pdf = extract
    ingestion.tokenize_pages = timed("tokenize", originals[1])
    lm.encode_tree = timed("encode", originals[2])
    ctx.tensors.save = timed("write", originals[3])
    ctx.qa.warm_prompt_cache = timed("prompt", originals[4])
    try:
        yield times
    finally:
        ingestion.extract_pdf, ingestion.tokenize_pages = originals[0], originals[1]
        del lm.encode_tree  # back to the class's method
        del ctx.tensors.save
        del ctx.qa.warm_prompt_cache


def app_context(work_dir: Path, lm: Any) -> Any:
    """A fresh app (SQLite + tensor store under `work_dir`) around an already loaded model."""
    from app.config import Settings
    from app.services.context import AppContext

    return AppContext(Settings(data_dir=Path(work_dir)), model=lm)


def stored_bytes(ctx: Any, doc_id: int) -> dict[str, int]:
    """Bytes on disk for one document: its tree file(s), `full`'s prompt cache and its text rows."""
    from sqlalchemy import select

    from app.services.prompt_cache import is_prompt_cache
    from storage import Chunk, ContextTreeRecord, Page

    with ctx.sessions() as s:
        files = s.execute(select(ContextTreeRecord.fingerprint, ContextTreeRecord.bytes)
                          .where(ContextTreeRecord.document_id == doc_id)).all()
        pages = sum(len(t.encode()) for t in s.scalars(select(Page.text).where(Page.document_id == doc_id)))
        chunks = sum(len(t.encode()) for t in s.scalars(select(Chunk.text).where(Chunk.document_id == doc_id)))
    tree = sum(b for f, b in files if not is_prompt_cache(f))
    prompt = sum(b for f, b in files if is_prompt_cache(f))
    return {"tree_bytes": int(tree), "prompt_cache_bytes": int(prompt), "text_bytes": int(pages + chunks)}


def kept_state(path: Path | None, encode: Callable[[], Any], from_tensors: Callable[[dict], Any], label: str) -> Any:
    """A development probe's encoded state: read from `path` when an earlier run kept it there,
    else encoded (timed, printed with `label`) and kept at `path` (None: not kept)."""
    from safetensors.torch import load_file, save_file

    if path is not None and path.exists():
        return from_tensors(load_file(str(path)))
    t0 = time.perf_counter()
    state = encode()
    print(f"{label} encoded in {time.perf_counter() - t0:.0f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: t.contiguous() for k, t in state.to_tensors().items()}, str(path))
    return state
