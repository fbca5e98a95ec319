"""The training-throughput benchmark runs both paths of the loop and reports items/s and MFU."""

from __future__ import annotations

import json

from bench.train_speed import main
from model.testing import write_tiny_checkpoint


def test_train_speed_reports_both_paths(tmp_path, model_data_dir):
    base = write_tiny_checkpoint(tmp_path / "tiny-llama", model_data_dir)
    out = tmp_path / "speed.json"
    main(["--model", str(base), "--data-dir", str(tmp_path / "data"), "--items", "2", "--steps", "1",
          "--min-ctx", "600", "--max-ctx", "900", "--json", str(out)])
    result = json.loads(out.read_text())
    paths = [row["path"] for row in result["rows"]]
    assert paths[:2] == ["per-item (old loop)", "batched"]
    assert all(row["items_per_s"] > 0 and 0 < row["mfu"] for row in result["rows"])
    assert result["gflop_per_item"] > 0 and result["speedup"] > 0
