"""Benchmarks: same-run ratios against the strongest honest peer, written to docs/benchmarks.md."""

import model  # noqa: F401  first: sets OMP_WAIT_POLICY before anything imports torch (model/threads.py)
