"""What every engine with a per-document state (`actqkv`'s block K/V, `homer`'s leaves) owes the
library, through the QA service: several documents read together, each state removed with its
document, another user's document refused, and the state built at ingestion when the engine is the
server's. Each engine's own behaviour is in test_app_actqkv.py / test_app_homer.py."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select
from test_app_actqkv import PAGES
from test_app_actqkv import SMALL as SMALL_ACTQKV
from test_app_homer import SMALL as SMALL_HOMER

from app.config import Settings
from app.services.context import AppContext
from app.services.errors import NotFound
from app.services.qa import Answer, AnswerSettings
from storage import ContextTreeRecord

KNOBS = {"actqkv": {"actqkv": SMALL_ACTQKV}, "homer": {"homer": SMALL_HOMER}}


def ask(ctx, engine, owner, question, docs):
    items = list(ctx.qa.answer(owner, question, docs, None, engine, AnswerSettings(max_new_tokens=8)))
    assert isinstance(items[-1], Answer)
    return items[-1]


def state_rows(ctx, engine):
    with ctx.sessions() as s:
        rows = s.scalars(select(ContextTreeRecord)).all()
        return [(r.document_id, r.path) for r in rows if r.fingerprint.startswith(f"{engine}-")]


@pytest.mark.parametrize("engine", list(KNOBS))
def test_states_go_with_their_document_and_several_documents_are_read_together(
        engine, settings, tiny_model, two_users, make_doc):
    ctx = AppContext(settings, model=dataclasses.replace(tiny_model, **KNOBS[engine]))
    alice, bob = two_users
    a = make_doc(alice.id, name="a.pdf", pages=PAGES)
    b = make_doc(alice.id, name="b.pdf", pages=PAGES[::-1])
    both = ask(ctx, engine, alice.id, "Which lot is delivered fastest?", [a, b])
    assert {d for d, _ in state_rows(ctx, engine)} == {a, b}
    assert {c["document"] for c in both.citations} <= {a, b}
    with pytest.raises(NotFound):  # another user's document is not readable through this engine either
        ask(ctx, engine, bob.id, "Which lot?", [a])
    [path] = [p for d, p in state_rows(ctx, engine) if d == a]
    ctx.documents.delete(alice.id, a)
    assert [d for d, _ in state_rows(ctx, engine)] == [b] and not ctx.tensors.absolute(path).exists()
    ctx.close()


@pytest.mark.parametrize("engine", list(KNOBS))
def test_ingestion_builds_the_state_when_the_engine_is_the_servers(engine, tiny_model, tmp_path):
    from app_testkit import write_pdf

    lm = dataclasses.replace(tiny_model, **KNOBS[engine])
    ctx = AppContext(Settings.load({"data_dir": tmp_path / "d", "engine": engine}, environ={}), model=lm)
    owner = ctx.auth.local_user().id
    stages = []
    info = ctx.ingestion.ingest_path(owner, write_pdf(tmp_path / "lots.pdf", PAGES),
                                     progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert info["status"] == "ready"
    encoding = [s for s in stages if s[0] == engine]
    # per execution block (actqkv) or piece (homer), to the end
    assert encoding and encoding[-1][1] == encoding[-1][2] > 1 and len(encoding) > 1
    assert [d for d, _ in state_rows(ctx, engine)] == [info["id"]]
    assert ctx.qa.warm_engine_state(owner, info["id"], engine) == 0  # already stored
    ctx.close()
