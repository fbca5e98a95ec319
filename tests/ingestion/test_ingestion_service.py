"""IngestionService on the fake model (fast) and, for the real tree round trip, the tiny model."""

from __future__ import annotations

import pytest
import torch
from ingestion_fakes import FakeModel
from pdf_factory import make_text_pdf, page_text
from sqlalchemy import func, select

from app.ingestion import DocumentNotFound, IngestionService, tokenize_pages
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


def test_load_trees_is_filtered_by_owner_and_round_trips(service, users, tmp_path):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    [loaded] = service.load_trees(users[0], [doc.id])
    expected = service.lm.encode_tree(loaded.token_ids.tolist())
    assert torch.equal(loaded.tree.chunk_means, expected.chunk_means)
    assert loaded.token_ids.dtype == torch.int32 and len(loaded.token_ids) == doc.tokens
    with pytest.raises(DocumentNotFound):
        service.load_trees(users[1], [doc.id])
    with pytest.raises(DocumentNotFound):
        service.load_trees(users[0], [doc.id + 100])


def test_model_change_reencodes_and_never_mixes(service, sessions, users, tmp_path, data_dir):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    new_model = FakeModel(chunk_len=32, fingerprint="fake-v2")
    [loaded] = service.load_trees(users[0], [doc.id], new_model)
    assert new_model.encode_calls == 1 and loaded.tree.n_chunks == -(-doc.tokens // 32)
    with sessions() as s:
        trees = list(s.scalars(select(ContextTreeRecord)))
        n_chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == doc.id))
    assert [t.fingerprint for t in trees] == ["fake-v2"] and n_chunks == loaded.tree.n_chunks
    assert _files(data_dir / "trees") == [trees[0].path]
    service.load_trees(users[0], [doc.id], new_model)
    assert new_model.encode_calls == 1  # the stored tree is reused for the same fingerprint


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_tree_file_is_detected_and_reencoded(service, sessions, users, tmp_path, data_dir, damage):
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
    [loaded] = service.load_trees(users[0], [doc.id])
    assert service.lm.encode_calls == calls + 1
    with sessions() as s:
        record = s.scalar(select(ContextTreeRecord))
    assert file_sha256(data_dir / "trees" / record.path) == record.sha256
    assert torch.equal(loaded.tree.chunk_means, service.lm.encode_tree(loaded.token_ids.tolist()).chunk_means)


def test_delete_document_removes_rows_and_files(service, sessions, users, tmp_path, data_dir):
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf"))
    assert not service.delete_document(users[1], doc.id)  # not bob's
    assert service.delete_document(users[0], doc.id)
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
    assert service.load_trees(users[0], [ready.id])


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

    service = IngestionService(sessions, TensorStore(data_dir / "trees"), tiny_model)
    doc = service.ingest(users[0], make_text_pdf(tmp_path / "a.pdf", n_pages=2))
    assert doc.status == "ready"
    [loaded] = service.load_trees(users[0], [doc.id])
    assert isinstance(loaded.tree, ContextTree)
    fresh = tiny_model.encode_tree(loaded.token_ids.tolist()).to_tensors()
    stored = loaded.tree.to_tensors()
    assert fresh.keys() == stored.keys()
    for key in fresh:
        assert torch.equal(fresh[key], stored[key]), key
    assert page_text(1).split("\n")[0] in tiny_model.tokenizer.decode(loaded.token_ids.tolist())

