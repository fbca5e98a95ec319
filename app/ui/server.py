"""`sharedllm serve`: open the context, repair interrupted ingestions, launch Gradio."""

from __future__ import annotations

import logging
from typing import Any

from app.config import Settings
from app.services.context import AppContext
from app.ui.app import CSS, build_app

logger = logging.getLogger(__name__)


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Launch options decided from settings: bind address, login, upload limit."""
    s = ctx.settings
    auth = ctx.auth.check_login if ctx.auth.has_accounts() else None
    if auth is None:
        logger.warning("no accounts: single-user mode without login (create one with `sharedllm users add`)")
        if s.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("serving on %s without accounts: anyone who can reach it can use it", s.host)
    return {
        "server_name": s.host,
        "server_port": s.port,
        "auth": auth,
        "auth_message": "SharedLLM DocQA: sign in with your account.",
        "max_file_size": f"{s.max_upload_mb}mb",
        "show_error": True,
        "footer_links": ["api"],
        "css": CSS,
    }


def prepare(settings: Settings, model: Any | None = None) -> tuple[AppContext, Any, Any]:
    """The context, the (queued, not yet launched) Blocks app and its DocQAApp."""
    ctx = AppContext(settings, model=model)
    ctx.auth.ensure_admin(settings.admin_user, settings.admin_password)
    ctx.model()  # load now: the first question should not pay for it
    report = ctx.ingestion.recover()
    if report.failed_documents:
        logger.warning("marked %d interrupted ingestion(s) failed", len(report.failed_documents))
    demo, web = build_app(ctx)
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.queue_max_size)
    return ctx, demo, web


def serve(settings: Settings) -> None:
    ctx, demo, web = prepare(settings)
    try:
        demo.launch(**web.launch_kwargs())
    finally:
        ctx.close()
