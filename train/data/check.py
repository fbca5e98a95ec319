"""Contamination check of a generated shard directory.

``python -m train.data.check DIR [--pdf PATH ...]`` decodes every item and reports

* items that contain an unambiguous licence marker (:data:`.sources.LICENCE_MARKERS`);
* items that share a run of ``--ngram`` (default 12) consecutive words with the text of any of the
  given PDFs (default: every PDF under ``/tmp/pdfs``, ``/usr/share/doc`` and ``bench/``), per PDF.

PDF text is read with pypdf only here, for the check; it never enters the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from .sources import LICENCE_MARKERS, PDF_SEARCH_ROOTS

log = logging.getLogger(__name__)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(text: str, n: int) -> set[int]:
    w = _words(text)
    return {hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


def pdf_text(path: Path) -> str:
    from pypdf import PdfReader  # noqa: PLC0415

    reader = PdfReader(str(path))
    parts = []
    for page in reader.pages:
        try:
            parts.append(page.extract_text() or "")
        except Exception:  # noqa: BLE001 - a broken page must not stop the check
            log.debug("cannot extract a page of %s", path, exc_info=True)
    return "\n".join(parts)


def find_pdfs() -> list[Path]:
    out = []
    for root in PDF_SEARCH_ROOTS:
        if root.is_dir():
            out += sorted(p for p in root.rglob("*") if p.suffix.lower() == ".pdf" and "mpl-data" not in str(p))
    return out


def check(shard_dir: str, tokenizer, pdfs: list[Path], n: int = 12, limit: int | None = None) -> dict:
    from .pack import ShardReader  # noqa: PLC0415

    pdf_sh: dict[str, set[int]] = {}
    for p in pdfs:
        try:
            pdf_sh[p.name] = shingles(pdf_text(p), n)
        except Exception:  # noqa: BLE001
            log.warning("cannot read %s", p, exc_info=True)
    reader = ShardReader(shard_dir)
    hits = {k: 0 for k in pdf_sh}
    examples: dict[str, str] = {}
    licence = 0
    total = len(reader) if limit is None else min(limit, len(reader))
    for i in range(total):
        it = reader[i]
        text = tokenizer.decode(it["context_ids"]) + "\n" + tokenizer.decode(it["target_ids"])
        low = text.lower()
        if any(m in low for m in LICENCE_MARKERS):
            licence += 1
        sh = shingles(text, n)
        for name, ps in pdf_sh.items():
            common = sh & ps
            if common:
                hits[name] += 1
                examples.setdefault(name, f"item {i} ({it['meta'].get('source')})")
    return {"items": total, "ngram": n, "licence_marker_items": licence, "pdf_overlap_items": hits,
            "examples": examples, "pdf_shingles": {k: len(v) for k, v in pdf_sh.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.data.check", description=__doc__)
    ap.add_argument("shards")
    ap.add_argument("--pdf", action="append", default=None)
    ap.add_argument("--ngram", type=int, default=12)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--data-dir", default="data")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .__main__ import load_model_tokenizer  # noqa: PLC0415

    manifest = json.loads((Path(a.shards) / "manifest.json").read_text())
    name = manifest.get("tokenizer")
    bundled = {"SmolLM2-135M-Instruct": "smollm2", "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-0.5b"}
    tok, _ = load_model_tokenizer(bundled.get(name, name), a.data_dir)
    pdfs = [Path(p) for p in a.pdf] if a.pdf else find_pdfs()
    res = check(a.shards, tok, pdfs, a.ngram, a.limit)
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
