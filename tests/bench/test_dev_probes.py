"""The development probes (`bench.actqkv_dev`, `bench.homer_dev`) on the tiny model: they run end to
end, keep and reuse encoded states, refuse variants they cannot honour and print a total per variant
(the lines docs/benchmarks.md quotes)."""

from __future__ import annotations

import re

import pytest

from bench import actqkv_dev, homer_dev


def _totals(out: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"^total .*: (\d+)/(\d+)$", out, re.M)]


def test_actqkv_probe_keeps_states_and_totals_every_variant(tmp_path, model_data_dir, capsys):
    args = ["--tiny", "--data-dir", str(model_data_dir), "--lengths", "2500", "--depths", "0.2,0.8",
            "--variants", '[{"lexical_blocks": 0}, {"lexical_blocks": 2}]', "--state-dir", str(tmp_path),
            "--max-new-tokens", "2", "--threads", "1"]
    actqkv_dev.main(args)
    first = capsys.readouterr().out
    assert [asked for _, asked in _totals(first)] == [2, 2]  # a total per variant, of its 2 questions
    assert "tokens encoded in" in first and len(list(tmp_path.glob("*-2500.safetensors"))) == 1
    actqkv_dev.main(args)  # the kept state is read back, not encoded again
    second = capsys.readouterr().out
    assert "tokens encoded in" not in second and _totals(second) == _totals(first)


def test_actqkv_probe_refuses_a_variant_that_changes_the_encoding(model_data_dir):
    with pytest.raises(SystemExit, match="block_size"):
        actqkv_dev.main(["--tiny", "--data-dir", str(model_data_dir), "--lengths", "2500",
                         "--variants", '[{"block_size": 32}]'])


def test_homer_probe_reports_what_survived_the_merges(tmp_path, model_data_dir, capsys):
    args = ["--tiny", "--data-dir", str(model_data_dir), "--length", "900", "--chunk", "1024", "--depths", "0.3,0.7",
            "--single-needle", "--variants", '[{}, {"bias": false}]', "--threads", "1", "--replicate", "1",
            "--state-dir", str(tmp_path)]
    homer_dev.main(args)
    out = capsys.readouterr().out
    assert out.count("leaves encoded in") == 2 and len(list(tmp_path.glob("*-900-*-r1.safetensors"))) == 2
    homer_dev.main(args)  # the kept leaves are read back, not encoded again: the same report
    again = capsys.readouterr().out
    assert "leaves encoded in" not in again
    assert again.splitlines() == [line for line in out.splitlines() if "leaves encoded in" not in line]
    assert len(re.findall(r"tokens in (\d+) leaves", out)) == 2  # one document per depth
    assert all(int(n) > 1 for n in re.findall(r"tokens in (\d+) leaves", out))  # merged, not one chunk
    kept = re.findall(r"digits kept (\d+)/(\d+), needle sentence kept (\d+)/(\d+)", out)
    assert len(kept) == 4 and all(int(a) <= int(b) and int(c) <= int(d) for a, b, c, d in kept)
    assert len(re.findall(r"^\{.*\}: \d+/1$", out, re.M)) == 4  # per document and variant
