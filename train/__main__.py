"""`python -m train ...` (same as `sharedllm train`)."""

from train.cli import main

raise SystemExit(main())
