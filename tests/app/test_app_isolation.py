"""Two users: B can neither list, read, retrieve from, cite, export nor delete anything of A's.

Checked twice: through the services directly and through the running web app with gradio_client
(logged in as each user), so the owner filter is proven on the server side, not only in the UI.
"""

from __future__ import annotations

import pytest
from app_testkit import launch_app
from gradio_client import Client

from app.services import ServiceError
from app.services.qa import AnswerSettings

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}
A_PAGES = ["Alice secret page. The launch code is PELICAN-7.", "Alice page two. Budget is 9 million."]
B_PAGES = ["Bob's memo. The meeting is on Tuesday.", "Bob page two. Lunch is at noon."]


class ServiceUser:
    """The same operations as the web endpoints, through the services."""

    def __init__(self, ctx, user):
        self.ctx, self.owner = ctx, user.id

    def list_documents(self):
        return self.ctx.documents.list(self.owner)

    def get_document(self, doc):
        return self.ctx.documents.get(self.owner, doc)

    def page_text(self, doc, page):
        return self.ctx.documents.page_text(self.owner, doc, page)

    def delete_document(self, doc):
        return self.ctx.documents.delete(self.owner, doc)

    def ask(self, question, docs, conversation=None):
        return self.ctx.qa.answer_all(
            self.owner, question, docs, conversation, "sharedllm", AnswerSettings(max_new_tokens=3)
        ).to_dict()

    def list_conversations(self):
        return self.ctx.conversations.list(self.owner)

    def get_conversation(self, conv):
        return self.ctx.conversations.transcript(self.owner, conv)

    def delete_conversation(self, conv):
        return self.ctx.conversations.delete(self.owner, conv)

    def export_conversation(self, conv, fmt):
        from app.export import export

        return export(self.ctx.conversations.transcript(self.owner, conv), fmt)


class WebUser:
    """A gradio_client session logged in as the user."""

    def __init__(self, url, username):
        self.client = Client(url, auth=(username, PASSWORDS[username]), verbose=False, download_files=False)

    def _call(self, name, *args):
        return self.client.predict(*args, api_name=f"/{name}")

    def list_documents(self):
        return self._call("list_documents")

    def get_document(self, doc):
        return self._call("get_document", doc)

    def page_text(self, doc, page):
        return self._call("page_text", doc, page)

    def delete_document(self, doc):
        return self._call("delete_document", doc)

    def ask(self, question, docs, conversation=None):
        return self._call("ask", question, docs, conversation, "sharedllm", 3)

    def list_conversations(self):
        return self._call("list_conversations")

    def get_conversation(self, conv):
        return self._call("get_conversation", conv)

    def delete_conversation(self, conv):
        return self._call("delete_conversation", conv)

    def export_conversation(self, conv, fmt):
        return self._call("export_conversation", conv, fmt)


@pytest.fixture
def world(ctx, make_doc):
    alice = ctx.auth.add_user("alice", PASSWORDS["alice"])
    bob = ctx.auth.add_user("bob", PASSWORDS["bob"])
    a_doc = make_doc(alice.id, "alice.pdf", A_PAGES)
    b_doc = make_doc(bob.id, "bob.pdf", B_PAGES)
    a_conv = ServiceUser(ctx, alice).ask("What is the launch code?", [a_doc])["conversation"]
    return {"alice": alice, "bob": bob, "a_doc": a_doc, "b_doc": b_doc, "a_conv": a_conv}


@pytest.fixture
def web(ctx, world):
    demo, url = launch_app(ctx)
    yield url
    demo.close()


def denied(call, *args):
    """The call must fail with a not-found error that reveals nothing about the object."""
    with pytest.raises(Exception) as info:
        call(*args)
    assert "not found" in str(info.value), str(info.value)
    assert "PELICAN" not in str(info.value) and "alice.pdf" not in str(info.value)


def check_isolation(bob, alice, world):
    a_doc, b_doc, a_conv = world["a_doc"], world["b_doc"], world["a_conv"]
    # list
    assert [d["id"] for d in bob.list_documents()] == [b_doc]
    assert [c["id"] for c in bob.list_conversations()] == []
    # read
    denied(bob.get_document, a_doc)
    denied(bob.page_text, a_doc, 1)
    # retrieve from / cite
    denied(bob.ask, "What is the launch code?", [a_doc])
    denied(bob.ask, "What is the launch code?", [b_doc, a_doc])
    answer = bob.ask("When is the meeting?", [b_doc])
    assert answer["citations"] and {c["document"] for c in answer["citations"]} == {b_doc}
    assert all("PELICAN" not in c["text"] for c in answer["citations"])
    # continue / read / export A's conversation
    denied(bob.ask, "And the budget?", [b_doc], a_conv)
    denied(bob.get_conversation, a_conv)
    for fmt in ("md", "json", "pdf"):
        denied(bob.export_conversation, a_conv, fmt)
    # delete
    denied(bob.delete_document, a_doc)
    denied(bob.delete_conversation, a_conv)
    # A still has everything, and sees none of B's
    assert [d["id"] for d in alice.list_documents()] == [a_doc]
    assert "PELICAN-7" in alice.page_text(a_doc, 1)
    assert [c["id"] for c in alice.list_conversations()] == [a_conv]
    denied(alice.get_document, b_doc)


def test_isolation_through_services(ctx, world):
    check_isolation(ServiceUser(ctx, world["bob"]), ServiceUser(ctx, world["alice"]), world)


def test_isolation_through_web_app(ctx, world, web):
    check_isolation(WebUser(web, "bob"), WebUser(web, "alice"), world)


def test_web_app_requires_login(ctx, world, web):
    """The server answers (a refused connection would not do) and refuses: no session, a wrong password."""
    import httpx

    body = {"data": [], "fn_index": 0, "session_hash": "x", "event_data": None, "trigger_id": None}
    assert httpx.get(web + "/gradio_api/info", timeout=10).status_code == 401
    assert httpx.post(web + "/gradio_api/queue/join", json=body, timeout=10).status_code == 401
    assert httpx.post(web + "/login", data={"username": "bob", "password": "wrong-password-1"}).status_code == 400
    assert httpx.post(web + "/login", data={"username": "bob", "password": PASSWORDS["bob"]}).status_code == 200


def test_service_errors_do_not_leak_existence(ctx, world):
    bob = ServiceUser(ctx, world["bob"])
    msgs = []
    for doc in (world["a_doc"], 10_000):
        with pytest.raises(ServiceError) as info:
            bob.get_document(doc)
        msgs.append(str(info.value).replace(str(doc), "N"))
    assert msgs[0] == msgs[1]  # someone else's document and a missing one look the same


def test_data_dir_is_never_served(tmp_path, tiny_model, monkeypatch):
    """Gradio's file routes must not hand out the database, uploads or trees, even from the cwd."""
    import httpx

    from app.config import Settings
    from app.services.context import AppContext

    monkeypatch.chdir(tmp_path)
    ctx = AppContext(Settings.load({"data_dir": "data"}, environ={}), model=tiny_model)
    demo, url = launch_app(ctx)
    try:
        db = tmp_path / "data" / "sharedllm.db"
        assert db.exists()
        for target in ("data/sharedllm.db", str(db), "/etc/passwd"):
            for prefix in ("/gradio_api/file=", "/file="):
                response = httpx.get(url + prefix + target, timeout=10)
                assert response.status_code in (403, 404), (prefix + target, response.status_code)
    finally:
        demo.close()
        ctx.close()
