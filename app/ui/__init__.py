"""The Gradio web UI: pages as classes (app.ui.pages), scriptable endpoints (app.ui.api),
assembly (app.ui.app) and the server entry point (app.ui.server)."""
