"""The Gradio web UI: pages as classes (app.ui.pages, app.ui.chat_page), scriptable endpoints
(app.ui.api), assembly (app.ui.app) and the server entry point (app.ui.server)."""
