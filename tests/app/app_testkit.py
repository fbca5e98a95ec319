"""Helpers shared by the app and browser tests (imported by tests/app/conftest.py and tests/browser)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from storage import Document, DocumentStatus

if TYPE_CHECKING:
    from app.services.context import AppContext


def make_ready_document(ctx: AppContext, owner_id: int, name: str, pages: list[str]) -> int:
    """A `ready` document made from page texts by the real ingestion steps after extraction
    (page-wise tokenisation, page and chunk rows, encoding, atomic store, the ready transaction)."""
    from app.ingestion import tokenize_pages

    lm = ctx.model()
    tokenized = tokenize_pages(lm.tokenizer, pages)
    with ctx.sessions.begin() as session:
        doc = Document(
            owner_id=owner_id, sha256=f"{name}-{owner_id}".ljust(64, "0")[:64], name=name,
            size_bytes=sum(len(p) for p in pages), pages=len(pages), tokens=len(tokenized.token_ids),
            status=DocumentStatus.ENCODING.value,
        )
        session.add(doc)
        session.flush()
        ctx.ingestion._add_page_rows(session, doc.id, pages, tokenized, lm)
        doc_id = doc.id
    ctx.ingestion._encode_and_store(doc_id, tokenized.token_ids, lm, None)
    return doc_id


def write_pdf(path, pages: list[str]) -> Path:
    """A real multi-page PDF with a text layer (fpdf2), one string per page."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return Path(path)


CONTRACT_PAGES = [
    "Service Agreement. This agreement between Acme Ltd and Beta GmbH starts on 1 March 2024 "
    "and covers the maintenance of the Beta ticketing platform.",
    "Fees. The annual fee is 12,500 euros, payable in advance each January. Late payments carry "
    "interest of 4 percent per year.",
    "Termination. Either party may terminate this agreement with ninety days written notice. "
    "The governing law is the law of Ireland.",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(ctx, port: int | None = None):
    """Start the real Gradio app (login on when accounts exist) on loopback; returns (demo, url)."""
    from app.ui.app import build_app

    demo, web = build_app(ctx)
    demo.queue(default_concurrency_limit=ctx.settings.concurrency_limit, max_size=ctx.settings.queue_max_size)
    kwargs = web.launch_kwargs()
    kwargs.update(
        server_name="127.0.0.1", server_port=port or free_port(), prevent_thread_lock=True, quiet=True
    )
    _, url, _ = demo.launch(**kwargs)
    return demo, url.rstrip("/")


class UiSession:
    """One browser-like session against the running app over plain HTTP: logs in with Gradio's form,
    uploads through `/gradio_api/upload`, and fires UI events (private ones included, by their
    api_name in /config) through the queue, as the page's JavaScript does. What an attacker with an
    account can do without the page."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None):
        import secrets

        import httpx

        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120)
        if username is not None:
            response = self.http.post("/login", data={"username": username, "password": password})
            response.raise_for_status()
        self.session_hash = secrets.token_hex(8)
        self.config = self.http.get("/config").json()
        self.fn_index = {d["api_name"]: d["id"] for d in self.config["dependencies"]}

    def output(self, done: dict, api_name: str, elem_id: str):
        """The value an event's result gives the component with `elem_id` (KeyError: not an output)."""
        [component] = [c["id"] for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id]
        outputs = self.config["dependencies"][self.fn_index[api_name]]["outputs"]
        if component not in outputs:
            raise KeyError(f"{api_name} does not update #{elem_id}")
        return done["output"]["data"][outputs.index(component)]

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            response = self.http.post("/gradio_api/upload", files={"files": (Path(path).name, f)})
        response.raise_for_status()
        return response.json()[0]

    @staticmethod
    def file_data(path: str, name: str | None = None) -> dict:
        return {"path": path, "orig_name": name or Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def start(self, api_name: str, *data) -> str:
        """Queues one event (as a click does); returns its event id."""
        body = {"data": list(data), "fn_index": self.fn_index[api_name], "session_hash": self.session_hash,
                "event_data": None, "trigger_id": None}
        joined = self.http.post("/gradio_api/queue/join", json=body)
        joined.raise_for_status()
        return joined.json()["event_id"]

    def messages(self):
        """This session's queue messages as they arrive (one event stream, as the page reads it)."""
        import json

        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session_hash}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:])

    def event(self, api_name: str, *data) -> dict:
        """Runs one event to completion; returns Gradio's `process_completed` message."""
        event_id = self.start(api_name, *data)
        for message in self.messages():
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                return message
        raise AssertionError(f"{api_name}: the event stream ended without a result")
