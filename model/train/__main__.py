"""`python -m model.train ...` (same as `sharedllm train`)."""

from model.train.cli import main

raise SystemExit(main())
