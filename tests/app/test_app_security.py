"""What a logged-in user could do to another's data through the running server, and what a stranger
could do to the login (issue 14, defects 1, 3 and 4). Every test goes through the real Gradio app."""

from __future__ import annotations

import re
import stat
import time

import pytest
from app_testkit import CONTRACT_PAGES, UiSession, launch_app, write_pdf
from gradio_client import Client

PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}


@pytest.fixture
def web(ctx, make_doc):
    alice = ctx.auth.add_user("alice", PASSWORDS["alice"])
    ctx.auth.add_user("bob", PASSWORDS["bob"])
    doc = make_doc(alice.id, "alice.pdf", ["Alice's secret. The launch code is PELICAN-7."])
    demo, url = launch_app(ctx)
    yield url, alice, doc
    demo.close()


def session(url: str, name: str) -> UiSession:
    return UiSession(url, name, PASSWORDS[name])


def export_url(output) -> str:
    """The download link the export button's output points at (a Gradio file or our own link)."""
    if isinstance(output, dict):
        return output["url"]
    match = re.search(r'href="([^"]+)"', str(output))
    assert match, output
    return match.group(1)


def alice_conversation(url, doc) -> int:
    alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False, download_files=False)
    return alice.predict("What is the launch code?", [doc], None, "rag", 4, api_name="/ask")["conversation"]


def test_exports_are_owner_scoped_temporary_and_anonymous(web, tmp_path):
    url, _, doc = web
    conversation = alice_conversation(url, doc)
    alice, bob = session(url, "alice"), session(url, "bob")
    assert alice.event("sidebar", None)["success"]
    assert alice.event("open_conversation", conversation)["success"]  # the chat's state: this conversation
    for fmt in ("md", "json", "pdf"):
        done = alice.event(f"export_{fmt}", conversation)
        assert done["success"], done
        link = export_url(done["output"]["data"][0])
        mine = alice.http.get(link)
        assert mine.status_code == 200 and (b"PELICAN" in mine.content or fmt == "pdf")
        # Bob, given Alice's link, gets nothing
        stolen = bob.http.get(link)
        assert stolen.status_code in (403, 404), (fmt, stolen.status_code)
        assert b"PELICAN" not in stolen.content
        # the name says what it is, not how many conversations the server holds
        disposition = mine.headers.get("content-disposition", "")
        assert f"conversation-{conversation}" not in disposition and f"-{conversation}." not in link


def test_upload_handler_takes_only_the_callers_own_uploads(web, tmp_path, ctx):
    url, alice_user, _ = web
    alice, bob = session(url, "alice"), session(url, "bob")
    pdf = write_pdf(tmp_path / "alice-contract.pdf", CONTRACT_PAGES)
    alice_path = alice.upload(pdf)  # Alice uploaded it, has not pressed "Add to library" yet
    done = bob.event("ingest_files", [UiSession.file_data(alice_path)])
    bob_user = ctx.auth.get("bob")
    assert ctx.documents.list(bob_user.id) == [], "Bob imported Alice's upload"
    assert "rejected" in str(done) or not done["success"]
    from pathlib import Path

    assert Path(alice_path).exists(), "Bob's call removed Alice's upload"
    # Alice's own upload works, once
    done = alice.event("ingest_files", [UiSession.file_data(alice_path)])
    assert done["success"] and "data-status='ready'" in done["output"]["data"][0]
    assert "alice-contract.pdf" in [d["name"] for d in ctx.documents.list(alice_user.id)]


def test_uploads_are_private_files(web, tmp_path, ctx):
    url, alice_user, _ = web
    alice = session(url, "alice")
    path = alice.upload(write_pdf(tmp_path / "contract.pdf", CONTRACT_PAGES))
    assert alice.event("ingest_files", [UiSession.file_data(path)])["success"]
    stored = list((ctx.settings.uploads_dir / str(alice_user.id)).glob("*.pdf"))
    assert stored and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in stored)
    assert stat.S_IMODE(stored[0].parent.stat().st_mode) == 0o700


def login(url, username, password) -> int:
    import httpx

    return httpx.post(url + "/login", data={"username": username, "password": password}).status_code


def test_login_locks_the_account_out(web):
    url = web[0]
    assert [login(url, "bob", f"guess-{i}-xxxx") for i in range(5)] == [400] * 5
    assert login(url, "bob", PASSWORDS["bob"]) == 400  # locked: even the right password is refused now
    assert login(url, "alice", PASSWORDS["alice"]) == 200  # other accounts are not locked with it


def test_login_is_rate_limited_per_client(web, ctx):
    url = web[0]
    limit = ctx.settings.login_max_failures_per_client
    codes = [login(url, f"user{i}", "wrong-password") for i in range(limit + 2)]
    assert codes[:limit] == [400] * limit and codes[limit:] == [429, 429], codes
    assert login(url, "alice", PASSWORDS["alice"]) == 429  # this client waits, whatever it tries


def test_server_enforces_the_answer_limits(web):
    url, _, doc = web
    alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False, download_files=False)
    started = time.monotonic()
    with pytest.raises(Exception, match="max_new_tokens"):
        alice.predict("What is the launch code?", [doc], None, "rag", 10_000_000, api_name="/ask")
    assert time.monotonic() - started < 30
    # (the UI's own event is bounded by Gradio's slider, which checks its maximum on the server)


def test_new_chat_clears_the_previous_export(web):
    """Issue 14, defect 9: the previous conversation's export stayed shown after New chat."""
    url, _, doc = web
    conversation = alice_conversation(url, doc)
    alice = session(url, "alice")
    alice.event("sidebar", None)
    alice.event("open_conversation", conversation)
    assert alice.event("export_md", conversation)["success"]
    for event in ("new_conversation", "open_conversation"):
        done = alice.event(event, conversation) if event == "open_conversation" else alice.event(event)
        assert alice.output(done, event, "export-file") in ("", None), event


def test_an_upload_is_usable_once_and_stays_private_while_ingested(tmp_path):
    from app.ui.access import UploadRegistry

    uploads = UploadRegistry()
    path = str(tmp_path / "x.pdf")
    uploads.record("alice", [path])
    assert not uploads.claim("bob", path) and uploads.claim("alice", path) and not uploads.claim("alice", path)
    assert uploads.readable_by("alice", path) and not uploads.readable_by("bob", path)
    assert uploads.readable_by("bob", str(tmp_path / "gradio-asset.css"))  # not an upload: Gradio's own
