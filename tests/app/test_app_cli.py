"""The `sharedllm` CLI in-process on the tiny model: JSON contracts, errors, progress on stderr."""

import json
import subprocess
import sys

import pytest

import app.services.context as context_module
from app.cli import main


@pytest.fixture
def cli(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(context_module, "_load_default", lambda settings: tiny_model)
    monkeypatch.delenv("SHAREDLLM_USER", raising=False)
    data = str(tmp_path / "data")

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(stdin))
        code = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_json(out: str):
    return json.loads(out)  # raises unless stdout is exactly one JSON document


def test_ingest_docs_ask_export_rm(cli, contract_pdf, tmp_path):
    code, out, err = cli("ingest", str(contract_pdf), "--json")
    assert code == 0, err
    [doc] = one_json(out)["documents"]
    assert set(doc) >= {"id", "name", "pages", "tokens", "status", "seconds"}
    assert (
        doc["status"] == "ready"
        and doc["pages"] == 3
        and doc["name"] == "contract.pdf"
        and doc["tokens"] > 50
    )

    code, out, _ = cli("docs", "--json")
    assert code == 0 and [d["id"] for d in one_json(out)["documents"]] == [doc["id"]]

    code, out, err = cli(
        "ask", "What is the annual fee?", "--doc", str(doc["id"]), "--max-new-tokens", "4", "--engine", "sharedllm",
        "--json",
    )
    assert code == 0, err
    answer = one_json(out)
    assert set(answer) == {"answer", "engine", "conversation", "citations", "timings", "warning"}
    assert "untrained" in answer["warning"]  # the tiny test model's cross-attention
    assert answer["engine"] == "sharedllm" and answer["timings"]["new_tokens"] == 4
    assert answer["citations"] and {"document", "page", "text"} <= set(answer["citations"][0])

    # --doc FILE.pdf with the same bytes reuses the stored document; --conversation continues
    code, out, _ = cli(
        "ask",
        "And the notice period?",
        "--doc",
        str(contract_pdf),
        "--conversation",
        str(answer["conversation"]),
        "--engine",
        "rag",
        "--max-new-tokens",
        "3",
        "--json",
    )
    second = one_json(out)
    assert code == 0 and second["conversation"] == answer["conversation"] and second["engine"] == "rag"
    assert one_json(cli("docs", "--json")[1])["documents"][0]["id"] == doc["id"]

    md = tmp_path / "conv.md"
    code, _, err = cli("export", str(answer["conversation"]), "--format", "md", "-o", str(md))
    assert code == 0, err
    text = md.read_text()
    assert "What is the annual fee?" in text and "contract.pdf, p. " in text
    code, out, _ = cli("export", str(answer["conversation"]), "--format", "json")
    assert code == 0 and len(one_json(out)["messages"]) == 4
    pdf = tmp_path / "conv.pdf"
    assert cli("export", str(answer["conversation"]), "--format", "pdf", "-o", str(pdf))[0] == 0
    assert pdf.read_bytes().startswith(b"%PDF")

    code, out, _ = cli("docs", "rm", str(doc["id"]), "--json")
    assert code == 0 and one_json(out)["deleted"]["id"] == doc["id"]
    assert one_json(cli("docs", "--json")[1])["documents"] == []


def test_human_output_streams_answer_and_sources(cli, contract_pdf):
    # rag always cites the chunks it put in the prompt (the tiny random model's words match no page,
    # so the default engine `full`, which cites by word overlap, may cite nothing here)
    code, out, err = cli("ask", "Who are the parties?", "--doc", str(contract_pdf), "--max-new-tokens", "3",
                         "--engine", "rag")
    assert code == 0, err
    assert "contract.pdf, p. " in out and "first token" in out and "(rag, conversation" in out


def test_errors_are_one_line_and_json(cli, tmp_path):
    code, out, err = cli("ask", "fee?", "--doc", "999", "--json")
    assert code == 1 and one_json(out) == {"error": "document 999 not found"}
    assert err.strip().splitlines()[-1] == "sharedllm: error: document 999 not found"
    code, out, err = cli("ask", "fee?", "--doc", str(tmp_path / "missing.pdf"))
    assert code == 1 and out == "" and "neither a document id nor a file" in err
    notpdf = tmp_path / "notes.txt"
    notpdf.write_text("hello")
    code, out, err = cli("ingest", str(notpdf), "--json")
    assert code == 1 and "only PDF files" in one_json(out)["documents"][0]["error"]
    code, out, _ = cli("export", "42", "--format", "md")
    assert code == 1 and "conversation 42 not found" in _


def test_bad_pdf_gives_status_and_nonzero_exit(cli, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n this is not really a pdf")
    code, out, err = cli("ingest", str(broken), "--json")
    assert code == 1
    [doc] = one_json(out)["documents"]
    assert doc["status"] == "failed" and doc["error"]


def test_users_add_list_rm_and_acting_user(cli, contract_pdf):
    code, out, err = cli(
        "users", "add", "alice", "--admin", "--password-stdin", "--json", stdin="alice-password-1\n"
    )
    assert code == 0, err
    assert one_json(out)["user"]["username"] == "alice"
    code, out, _ = cli("users", "list", "--json")
    assert [u["username"] for u in one_json(out)["users"]] == ["alice"]
    assert cli("ingest", str(contract_pdf), "--user", "alice", "--json")[0] == 0
    assert len(one_json(cli("docs", "--user", "alice", "--json")[1])["documents"]) == 1
    assert one_json(cli("docs", "--json")[1])["documents"] == []  # the `local` owner sees nothing of alice's
    code, out, _ = cli("users", "add", "bob", "--password-stdin", "--json", stdin="short\n")
    assert code == 1 and "too short" in one_json(out)["error"]
    assert cli("users", "rm", "alice", "--json")[0] == 0
    assert one_json(cli("users", "list", "--json")[1])["users"] == []
    code, out, _ = cli("docs", "--user", "alice", "--json")
    assert code == 1 and "no such user" in one_json(out)["error"]


def test_console_script_help():
    exe = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert exe.returncode == 0
    for command in ("serve", "ingest", "docs", "ask", "export", "users"):
        assert command in exe.stdout


def test_users_rm_removes_the_users_files(cli, contract_pdf, tmp_path, monkeypatch):
    """Issue 14, defect 2: `users rm` said everything was removed while the PDFs stayed on disk."""
    monkeypatch.setenv("SHAREDLLM_ENGINE", "sharedllm")  # its tree is encoded at ingestion: a file of each kind
    assert cli("users", "add", "alice", "--password-stdin", stdin="alice-password-1\n")[0] == 0
    code, out, err = cli("ingest", str(contract_pdf), "--user", "alice", "--json")
    assert code == 0, err
    data = tmp_path / "data"
    uploads = [p for p in (data / "uploads").rglob("*") if p.is_file()]
    trees = [p for p in (data / "trees").rglob("*") if p.is_file()]
    assert uploads and trees
    assert cli("users", "rm", "alice")[0] == 0
    assert [p for p in uploads + trees if p.exists()] == []


def test_ingest_json_reports_every_file(cli, contract_pdf, tmp_path, monkeypatch):
    """Issue 14, defect 6: one over-limit file stopped the run with only {"error"}: the files stored
    before it went unreported and the ones after it were skipped."""
    from app_testkit import write_pdf

    monkeypatch.setenv("SHAREDLLM_MAX_UPLOAD_MB", "1")
    big = tmp_path / "big.pdf"
    big.write_bytes(contract_pdf.read_bytes() + b"\n%" + b"x" * (2 << 20))
    notes = tmp_path / "notes.txt"
    notes.write_text("plain text")
    other = write_pdf(tmp_path / "other.pdf", ["Another document. The fee is 7 euros."])
    code, out, err = cli("ingest", str(contract_pdf), str(big), str(notes), str(other), "--json")
    assert code == 1
    docs = one_json(out)["documents"]
    assert [(d["name"], d["status"]) for d in docs] == [
        ("contract.pdf", "ready"), ("big.pdf", "rejected"), ("notes.txt", "rejected"), ("other.pdf", "ready")
    ]
    assert "upload limit" in docs[1]["error"] and "only PDF" in docs[2]["error"]
    assert docs[0]["id"] and docs[1]["id"] is None
    assert "2 of 4 files not ready" in err


def test_handover_gives_single_user_documents_to_an_account(cli, contract_pdf, tmp_path):
    """Issue 14, defect 11: what was uploaded in single-user mode belongs to `local` and is not shown
    once accounts exist; `users handover local NAME` gives it to an account."""
    code, out, _ = cli("ingest", str(contract_pdf), "--json")
    [doc] = one_json(out)["documents"]
    assert cli("users", "add", "alice", "--password-stdin", stdin="alice-password-1\n")[0] == 0
    assert one_json(cli("docs", "--user", "alice", "--json")[1])["documents"] == []
    code, out, err = cli("users", "handover", "local", "alice", "--json")
    assert code == 0, err and one_json(out)["handed_over"]["documents"] == [doc["id"]]
    assert [d["id"] for d in one_json(cli("docs", "--user", "alice", "--json")[1])["documents"]] == [doc["id"]]
    assert one_json(cli("docs", "--json")[1])["documents"] == []
    alice_id = one_json(cli("users", "list", "--json")[1])["users"][0]["id"]
    assert list((tmp_path / "data" / "uploads" / str(alice_id)).glob("*.pdf"))
    code, out, err = cli("ask", "What is the fee?", "--doc", str(doc["id"]), "--user", "alice", "--engine", "rag",
                         "--max-new-tokens", "3", "--json")
    assert code == 0, err
