"""IngestionService and the library's tree path (load, repair, cache invalidation) as the app wires
them, on the fake model (fast) and, for the real tree round trip, the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_library, make_service
from ingestion_fakes import FakeModel
from pdf_factory import make_text_pdf, page_text
from sqlalchemy import func, select

from app.ingestion import tokenize_pages
from app.services.errors import NotFound
from storage import Chunk, ContextTreeRecord, Document, Page, TensorStore
from storage.tensors import file_sha256


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_ingest_text_pdf_becomes_ready_with_pages_chunks_and_tree(service, sessions, users, tmp_path, data_dir):
    pdf = make_text_pdf(tmp_path / "contract.pdf", n_pages=4)
    events = []
    doc = service.ingest(users[0], pdf, progress=lambda *e: events.append(e))
    assert doc.status == "ready" and doc.error is None
    assert doc.pages == 4 and doc.tokens > 0 and doc.name == "contract.pdf"
    assert doc.sha256 == file_sha256(pdf)
    assert (data_dir / "uploads" / str(users[0]) / f"{doc.sha256}.pdf").read_bytes() == pdf.read_bytes()
    assert ("extract", 4, 4) in events and events[-1][0] == "encode" and events[-1][1] == events[-1][2]
    with sessions() as s:
        pages = list(s.scalars(select(Page).where(Page.document_id == doc.id).order_by(Page.number)))
        chunks = list(s.scalars(select(Chunk).where(Chunk.document_id == doc.id).order_by(Chunk.index)))
        trees = list(s.scalars(select(ContextTreeRecord)))
    assert [p.number for p in pages] == [1, 2, 3, 4]
    assert pages[0].token_start == 0 and pages[-1].token_end == doc.tokens
    assert all(a.token_end == b.token_start for a, b in zip(pages, pages[1:]))
    # Running header and page-number footer are gone; clause numbers and amounts are kept.
    assert "ACME" not in pages[1].text and "Page 2 of 4" not in pages[1].text
    assert "2.1 Clause 2 applies to amount 2037." in pages[1].text
    assert len(chunks) == -(-doc.tokens // 64)
    assert chunks[-1].token_end == doc.tokens and chunks[0].page_start == 1 and chunks[-1].page_end == 4
    for c in chunks:
        covering = [p.number for p in pages if p.token_start < c.token_end and p.token_end > c.token_start]
        assert (c.page_start, c.page_end) == (min(covering), max(covering))
    assert "".join(c.text for c in chunks) == "".join(p.text + "\n\n" for p in pages)
    assert len(trees) == 1 and trees[0].fingerprint == "fake-v1" and trees[0].sha256 == file_sha256(
        data_dir / "trees" / trees[0].path)


def test_same_bytes_twice_is_one_document_per_user(service, users, tmp_path, fake_model, sessions):
    pdf = make_text_pdf(tmp_path / "a.pdf")
    copy = tmp_path / "renamed.pdf"
    copy.write_bytes(pdf.read_bytes())
    first = service.ingest(users[0], pdf)
    again = service.ingest(users[0], copy, name="other name.pdf")
    other_user = service.ingest(users[1], pdf)
    assert again.id == first.id and other_user.id != first.id
    assert fake_model.encode_calls == 2  # once per user, not per upload
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Document)) == 2


def test_library_loads_trees_by_owner_and_round_trips(service, library, users, tmp_path):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    [loaded] = library.load_for_qa(users[0], [doc.id], "fake-v1")
    expected = service.lm.encode_tree(loaded.token_ids)
    assert torch.equal(loaded.tree.chunk_means, expected.chunk_means) and len(loaded.token_ids) == doc.tokens
    with pytest.raises(NotFound):
        library.load_for_qa(users[1], [doc.id], "fake-v1")
    with pytest.raises(NotFound):
        library.load_for_qa(users[0], [doc.id + 100], "fake-v1")


def test_model_change_reencodes_and_never_mixes(service, sessions, users, tmp_path, data_dir):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    new_model = FakeModel(chunk_len=32, fingerprint="fake-v2")
    library = make_library(sessions, data_dir, make_service(sessions, data_dir, new_model))
    [loaded] = library.load_for_qa(users[0], [doc.id], "fake-v2")
    assert new_model.encode_calls == 1 and loaded.tree.n_chunks == -(-doc.tokens // 32)
    with sessions() as s:
        trees = list(s.scalars(select(ContextTreeRecord)))
        n_chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == doc.id))
    assert [t.fingerprint for t in trees] == ["fake-v2"] and n_chunks == loaded.tree.n_chunks
    assert _files(data_dir / "trees") == [trees[0].path]
    library.load_for_qa(users[0], [doc.id], "fake-v2")
    assert new_model.encode_calls == 1  # the stored tree is reused for the same fingerprint


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_tree_file_is_detected_and_reencoded(service, library, sessions, users, tmp_path, data_dir,
                                                      damage):
    """The production repair path: the library's load fails on the file, ingestion re-encodes it, and
    the cache serves the new version, never the old one."""
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    with sessions() as s:
        record = s.scalar(select(ContextTreeRecord))
    path = data_dir / "trees" / record.path
    data = bytearray(path.read_bytes())
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[-3] ^= 0x10
        path.write_bytes(data)
    calls = service.lm.encode_calls
    [loaded] = library.load_for_qa(users[0], [doc.id], "fake-v1")
    assert service.lm.encode_calls == calls + 1
    with sessions() as s:
        new = s.scalar(select(ContextTreeRecord))
    assert file_sha256(data_dir / "trees" / new.path) == new.sha256
    assert torch.equal(loaded.tree.chunk_means, service.lm.encode_tree(loaded.token_ids).chunk_means)
    calls = service.lm.encode_calls
    [again] = library.load_for_qa(users[0], [doc.id], "fake-v1")
    assert again.tree is loaded.tree and service.lm.encode_calls == calls  # cached, not re-encoded


def test_delete_document_removes_rows_and_files(service, library, sessions, users, tmp_path, data_dir):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    with pytest.raises(NotFound):
        library.delete(users[1], doc.id)  # not bob's
    library.delete(users[0], doc.id)
    with sessions() as s:
        for table in (Document, Page, Chunk, ContextTreeRecord):
            assert s.scalar(select(func.count()).select_from(table)) == 0
    assert _files(data_dir / "trees") == [] and _files(data_dir / "uploads") == []


def test_recover_fails_interrupted_rows_and_removes_orphans(service, sessions, users, tmp_path, data_dir):
    ready = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    with sessions.begin() as s:  # what a crash mid-encoding leaves
        stuck = Document(owner_id=users[0], sha256="f" * 64, name="stuck.pdf", status="encoding")
        s.add(stuck)
        s.flush()
        s.add(Page(document_id=stuck.id, number=1, text="x", token_start=0, token_end=1))
        stuck_id = stuck.id
    store = TensorStore(data_dir / "trees")
    store.save(stuck_id, "fake-v1", {"x": torch.zeros(3)})  # renamed but never recorded
    (data_dir / "trees" / "9").mkdir()
    (data_dir / "trees" / "9" / ".half.safetensors.abc.tmp").write_bytes(b"partial")
    (data_dir / "uploads" / str(users[0]) / ".dead.tmp").write_bytes(b"partial")
    report = service.recover()
    assert report.failed_documents == [stuck_id] and len(report.removed_files) == 3
    with sessions() as s:
        assert s.get(Document, stuck_id).status == "failed"
        assert "interrupted" in s.get(Document, stuck_id).error
        assert s.scalar(select(func.count()).select_from(Page).where(Page.document_id == stuck_id)) == 0
        record = s.scalar(select(ContextTreeRecord))
    assert _files(data_dir / "trees") == [record.path]
    assert _files(data_dir / "uploads") == [f"{users[0]}/{ready.sha256}.pdf"]
    assert make_library(sessions, data_dir, service).load_for_qa(users[0], [ready.id], "fake-v1")


def test_failed_document_is_retried_on_next_upload(service, users, tmp_path, monkeypatch):
    pdf = make_text_pdf(tmp_path / "a.pdf")
    monkeypatch.setattr(service.lm, "encode_tree", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = service.ingest(users[0], pdf)
    assert failed.status == "failed" and "encode failed: RuntimeError: boom" in failed.error
    monkeypatch.undo()
    again = service.ingest(users[0], pdf)
    assert again.id == failed.id and again.status == "ready"


def test_tokenize_pages_keeps_page_ranges():
    from ingestion_fakes import ByteTokenizer

    tok = tokenize_pages(ByteTokenizer(), ["ab", "", "cde"])
    assert tok.page_spans == [(0, 4), (4, 4), (4, 9)] and len(tok.token_ids) == 9


def test_tiny_model_end_to_end_exact_tree_round_trip(tiny_model, sessions, users, tmp_path, data_dir):
    from model import ContextTree

    service = make_service(sessions, data_dir, tiny_model)
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf", n_pages=2))
    assert doc.status == "ready"
    library = make_library(sessions, data_dir, service, tree_factory=None)
    [loaded] = library.load_for_qa(users[0], [doc.id], tiny_model.fingerprint)
    assert isinstance(loaded.tree, ContextTree)
    fresh = tiny_model.encode_tree(loaded.token_ids).to_tensors()
    stored = loaded.tree.to_tensors()
    assert fresh.keys() == stored.keys()
    for key in fresh:
        assert torch.equal(fresh[key], stored[key]), key
    assert page_text(1).split("\n")[0] in tiny_model.tokenizer.decode(loaded.token_ids)


def test_encoding_reports_progress_per_chunk(tiny_model, sessions, users, tmp_path, data_dir):
    """Issue 14, defect 7: the bar sat at 20 % "reading text" for minutes (1,000 pages: 287 s) while
    the first 16K-token batch was encoded. On a CPU, progress now comes per chunk, from the start."""
    service = make_service(sessions, data_dir, tiny_model)
    events = []
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf", n_pages=6), progress=lambda *e: events.append(e))
    n_chunks = -(-doc.tokens // tiny_model.config.chunk_len)
    encode = [(done, total) for stage, done, total in events if stage == "encode"]
    assert n_chunks >= 8 and encode[0] == (0, 1)  # "encoding" shows as soon as extraction ended
    steps = {done for done, total in encode[1:]}
    assert len(steps) >= 3 * n_chunks - 2, (n_chunks, sorted(steps))  # every chunk, at each of 3 levels
