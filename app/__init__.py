"""What users touch: ingestion and QA services, the Gradio UI, the CLI, transcript export."""
