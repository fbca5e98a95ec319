"""Runs one ingestion in its own process so a test can kill -9 it: `python ingest_child.py URL DATA PDF OWNER`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ingestion_fakes import FakeModel  # noqa: E402

from app.extraction import ExtractionLimits  # noqa: E402
from app.ingestion import IngestionService  # noqa: E402
from storage import TensorStore, make_session_factory  # noqa: E402


def main() -> None:
    url, data_dir, pdf, owner = sys.argv[1:5]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    model = FakeModel(delay_per_chunk=0.002)
    service = IngestionService(make_session_factory(url), TensorStore(Path(data_dir) / "trees"), lambda: model,
                               uploads_dir=Path(data_dir) / "uploads", limits=ExtractionLimits())
    print("started", flush=True)
    doc = service.ingest(int(owner), pdf)
    print("done", doc.status, flush=True)


if __name__ == "__main__":
    main()
