"""What users touch: ingestion and QA services, the Gradio UI, the CLI, transcript export."""

import model  # noqa: E402,F401  first: sets OMP_WAIT_POLICY before anything imports torch (model/threads.py)
