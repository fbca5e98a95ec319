"""The `sharedllm` command: the scriptable face of the app (DESIGN section 6).

Every command takes `--data-dir` and `--model` (before or after the command name). With `--json` a
command prints exactly one JSON document on stdout; logs and progress bars go to stderr. Errors exit
non-zero with a one-line reason on stderr (and `{"error": "..."}` on stdout under `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger("app.cli")

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line reason for a failed command."""


class PartialFailure(CliError):
    """Some of the work failed: the result is still printed (under --json), the exit code is non-zero."""

    def __init__(self, reason: str, result: Any):
        super().__init__(reason)
        self.result = result


# --- parser --------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every command takes; on sub-commands their defaults do not override the main parser's."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--data-dir", default=default, help="data directory (default ./data or SHAREDLLM_DATA_DIR)"
    )
    parser.add_argument(
        "--model",
        default=default,
        help="bundled model name (qwen2.5-0.5b, the default; smollm2), checkpoint directory or .gguf "
        "(or SHAREDLLM_MODEL)",
    )
    parser.add_argument("--device", default=default, help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--user",
        default=default,
        help="account to act as (default: SHAREDLLM_USER, else the single-user 'local' owner)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharedllm", description="Long-document QA on SharedLLM.")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, suppress=True)
        return p

    p = command("serve", "start the web UI (Gradio)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1, or SHAREDLLM_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or SHAREDLLM_PORT)")

    p = command("ingest", "add PDFs to the library (same content is reused, not re-encoded)")
    p.add_argument("files", nargs="+", metavar="FILE.pdf")
    _json_flag(p)

    p = command("docs", "list documents (`docs rm ID` deletes one)")
    _json_flag(p)
    docs_sub = p.add_subparsers(dest="docs_command", metavar="rm")
    rm = docs_sub.add_parser("rm", help="delete a document, its chunks and tensor files")
    _common(rm, suppress=True)
    rm.add_argument("id", type=int)
    _json_flag(rm)

    p = command("ask", "ask a question about one or more documents")
    p.add_argument("question")
    p.add_argument(
        "--doc",
        action="append",
        default=[],
        metavar="ID|FILE.pdf",
        help="document id, or a PDF (ingested first when new); repeatable",
    )
    p.add_argument("--engine", default=None, help="an engine of app.services.engines.ENGINES (default: the server's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--conversation", type=int, default=None, help="continue this conversation")
    _json_flag(p)

    p = command("export", "export a conversation with its cited passages")
    p.add_argument("conversation", type=int, metavar="CONVERSATION_ID")
    p.add_argument("--format", choices=("md", "json", "pdf"), default="md")
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout for md/json)")

    p = command("conversations", "list conversations")
    _json_flag(p)

    p = sub.add_parser(
        "train", help="train SharedLLM weights for a base model (the train/ package)", conflict_handler="resolve"
    )
    _common(p, suppress=True)
    _add_train_arguments(p)
    _json_flag(p)

    p = command("bench", "quality and speed tables + plots (see `python -m bench --help`)")
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="BENCHMARK [OPTIONS]",
        help="speed | model | ingest | quality | smoke | all, then bench options",
    )

    p = command("users", "manage accounts (a login is required in the UI once one exists)")
    users_sub = p.add_subparsers(dest="users_command", required=True, metavar="add|list|rm|passwd|handover")
    for name, help_text in (
        ("add", "create an account"),
        ("list", "list accounts"),
        ("rm", "delete an account and everything it owns"),
        ("passwd", "change a password"),
        ("handover", "give every document and conversation of one owner (e.g. the single-user `local`) to "
                     "another account"),
    ):
        u = users_sub.add_parser(name, help=help_text)
        _common(u, suppress=True)
        _json_flag(u)
        if name == "handover":
            u.add_argument("from_user", metavar="FROM")
            u.add_argument("username", metavar="TO")
        elif name != "list":
            u.add_argument("username")
        if name in ("add", "passwd"):
            u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "add":
            u.add_argument("--admin", action="store_true")
    return parser


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from train.cli import add_arguments
    except ImportError:  # training code not installed: the command explains itself when run
        return
    add_arguments(parser)


# --- entry point -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        args.bench_args = [*args.bench_args, *extra]
    _setup_logging(bool(getattr(args, "verbose", False)))
    as_json = bool(getattr(args, "json", False))
    real_stdout = sys.stdout
    try:
        # Anything a library prints goes to stderr: stdout carries only the command's output.
        with contextlib.redirect_stdout(sys.stderr):
            result = _dispatch(args, real_stdout)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback under --verbose
        reason = _one_line(exc)
        logger.debug("command failed", exc_info=True)
        print(f"sharedllm: error: {reason}", file=sys.stderr)
        if as_json:
            payload = exc.result if isinstance(exc, PartialFailure) else {"error": reason}
            _emit_json(payload, real_stdout)
        return EXIT_ERROR
    if as_json and result is not None:
        _emit_json(result, real_stdout)
    return 0


def _dispatch(args: argparse.Namespace, out: TextIO) -> Any:
    from app.config import Settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir, "model": args.model, "device": args.device}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port)
    settings = Settings.load(overrides)
    handler = {
        "serve": cmd_serve,
        "ingest": cmd_ingest,
        "docs": cmd_docs,
        "ask": cmd_ask,
        "export": cmd_export,
        "conversations": cmd_conversations,
        "users": cmd_users,
        "train": cmd_train,
        "bench": cmd_bench,
    }[args.command]
    return handler(args, settings, out)


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        for noisy in ("httpx", "urllib3", "alembic", "gradio", "uvicorn.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 500 else text[:497] + "..."


def _emit_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    out.flush()


def _context(settings, need_model: bool = False):
    from app.services.context import AppContext

    return AppContext(settings)


def _owner(ctx, args: argparse.Namespace):
    from app.auth import AuthError

    username = getattr(args, "user", None) or os.environ.get("SHAREDLLM_USER")
    try:
        return ctx.auth.get(username) if username else ctx.auth.local_user()
    except AuthError as exc:
        raise CliError(str(exc)) from None


# --- commands --------------------------------------------------------------------------------------
def cmd_serve(args, settings, out):
    from app.ui.server import serve

    serve(settings)


def _ingest_files(ctx, owner_id: int, files: list[str]) -> list[dict[str, Any]]:
    """Every file's outcome, in order: stored ones with their status, refused ones as `rejected`."""
    from tqdm import tqdm

    from app.ingestion import rejected
    from app.services import ServiceError

    results = []
    for name in files:
        path = Path(name)
        with tqdm(total=1, desc=path.name[:30], unit="chunk", file=sys.stderr, leave=True) as bar:

            def progress(stage: str, done: int, total: int) -> None:
                bar.set_postfix_str(stage)
                if total and bar.total != total:
                    bar.reset(total=total)
                bar.n = done
                bar.refresh()

            try:
                results.append(ctx.ingestion.ingest_path(owner_id, path, progress=progress))
            except ServiceError as exc:  # refused before anything was stored: say so, go on with the rest
                results.append(rejected(path.name, str(exc)))
    return results


def cmd_ingest(args, settings, out):
    ctx = _context(settings)
    try:
        owner = _owner(ctx, args)
        docs = _ingest_files(ctx, owner.id, args.files)
    finally:
        ctx.close()
    if not args.json:
        for d in docs:
            reason = f" ({d['error']})" if d.get("error") else ""
            out.write(
                f"{d['id']}\t{d['status']}{reason}\t{d['pages']} pages\t{d['tokens']} tokens\t"
                f"{d['seconds']:.1f} s\t{d['name']}\n"
            )
    failed = [d for d in docs if d["status"] != "ready"]
    result = {
        "documents": [
            {k: d[k] for k in ("id", "name", "pages", "tokens", "status", "seconds", "error")} for d in docs
        ]
    }
    if failed:
        raise PartialFailure(
            f"{len(failed)} of {len(docs)} files not ready: "
            + "; ".join(f"{d['name']}: {d['status']}" for d in failed),
            result,
        )
    return result


def cmd_docs(args, settings, out):
    ctx = _context(settings)
    try:
        owner = _owner(ctx, args)
        if args.docs_command == "rm":
            info = ctx.documents.delete(owner.id, args.id)
            if not args.json:
                out.write(f"deleted document {info['id']} ({info['name']})\n")
            return {"deleted": {"id": info["id"], "name": info["name"]}}
        docs = ctx.documents.list(owner.id)
    finally:
        ctx.close()
    if not args.json:
        out.write("id\tstatus\tpages\ttokens\tname\n")
        for d in docs:
            out.write(f"{d['id']}\t{d['status']}\t{d['pages']}\t{d['tokens']}\t{d['name']}\n")
    return {"documents": docs}


def cmd_ask(args, settings, out):
    from app.services.qa import Answer, AnswerSettings

    if not args.doc and args.conversation is None:
        raise CliError("give at least one --doc ID|FILE.pdf (or --conversation ID)")
    ctx = _context(settings)
    try:
        owner = _owner(ctx, args)
        doc_ids: list[int] = []
        for ref in args.doc:
            if ref.isdigit() and not Path(ref).exists():
                doc_ids.append(int(ref))
                continue
            if not Path(ref).is_file():
                raise CliError(f"--doc {ref!r} is neither a document id nor a file")
            [doc] = _ingest_files(ctx, owner.id, [ref])
            if doc["status"] != "ready":
                raise CliError(
                    f"{doc['name']}: {doc['status']}" + (f" ({doc['error']})" if doc.get("error") else "")
                )
            doc_ids.append(doc["id"])
        answer_settings = AnswerSettings(
            max_new_tokens=args.max_new_tokens or settings.max_new_tokens,
            temperature=settings.temperature if args.temperature is None else args.temperature,
            max_citations=settings.max_citations,
        )
        from tqdm import tqdm

        final = None
        bars: list[Any] = []

        def progress(stage: str, done: int, total: int) -> None:
            """A bar on stderr per stage: an engine's per-document state built on its first use (e.g.
            actqkv's blocks), homer's merges before its first token."""
            desc = "homer merges" if stage == "merge" else f"{stage} (first use)"
            if bars and bars[0].desc != desc:
                bars.pop().close()
            if not bars:
                bars.append(tqdm(total=total, desc=desc, unit="merge" if stage == "merge" else "step",
                                 file=sys.stderr))
            bars[0].n = done
            bars[0].refresh()

        for item in ctx.qa.answer(
            owner.id,
            args.question,
            doc_ids,
            args.conversation,
            args.engine or settings.engine,
            answer_settings,
            progress=progress,
        ):
            if bars and not isinstance(item, Answer):
                bars.pop().close()
            if isinstance(item, Answer):
                final = item
            elif isinstance(item, str) and not args.json:
                out.write(item)
                out.flush()
        for bar in bars:
            bar.close()
    finally:
        ctx.close()
    if not args.json:
        out.write("\n")
        for i, c in enumerate(final.citations, 1):
            out.write(f"[{i}] {c['name']}, p. {c['page']}: {c['text'][:200]}\n")
        t = final.timings
        out.write(
            f"({final.engine}, conversation {final.conversation}: retrieval {t['retrieval_s']:.2f} s, "
            f"first token {t['ttft_s']:.2f} s, total {t['total_s']:.2f} s, "
            f"{t['tokens_per_s']:.1f} tokens/s)\n"
        )
    return final.to_dict()


def cmd_export(args, settings, out):
    from app.export import export

    ctx = _context(settings)
    try:
        owner = _owner(ctx, args)
        data = export(ctx.conversations.transcript(owner.id, args.conversation), args.format)
    finally:
        ctx.close()
    if args.output:
        Path(args.output).write_bytes(data)
        print(f"wrote {args.output} ({len(data)} bytes)", file=sys.stderr)
    elif args.format == "pdf" and out.isatty():
        raise CliError("refusing to write a PDF to a terminal: use -o FILE")
    else:
        out.buffer.write(data) if hasattr(out, "buffer") else out.write(data.decode("utf-8", "replace"))
        out.flush()
    return None


def cmd_conversations(args, settings, out):
    ctx = _context(settings)
    try:
        convs = ctx.conversations.list(_owner(ctx, args).id)
    finally:
        ctx.close()
    if not args.json:
        for c in convs:
            out.write(f"{c['id']}\t{c['updated_at']}\t{c['engine']}\t{c['title']}\n")
    return {"conversations": convs}


def cmd_train(args, settings, out):
    try:
        from train.cli import run
    except ImportError as exc:
        raise CliError(f"training is not available in this install ({exc})") from None
    weights = run(args, settings.data_dir)
    if not args.json:
        out.write(f"weights written to {weights}\n")
    return {"weights": str(weights)}


def cmd_bench(args, settings, out):
    """Runs `python -m bench` with the app's data dir and model unless the bench options name them.
    A child process, not an import: `bench` sits above the app and the app never imports it."""
    import subprocess

    extra = list(args.bench_args)
    if "--data-dir" not in extra:
        extra += ["--data-dir", str(settings.data_dir)]
    if settings.model and "--model" not in extra:
        extra += ["--model", settings.model]
    if subprocess.run([sys.executable, "-m", "bench", *extra], check=False).returncode != 0:
        raise CliError("benchmark failed")
    return None


def _read_password(args) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for a password: use --password-stdin")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise CliError("passwords differ")
    return first


def cmd_users(args, settings, out):
    from app.auth import LOCAL_USER

    ctx = _context(settings)
    try:
        auth = ctx.auth
        if args.users_command == "list":
            users = [u.to_dict() for u in auth.list_users()]
            if not args.json:
                for u in users:
                    out.write(f"{u['id']}\t{u['username']}\t{'admin' if u['is_admin'] else ''}\n")
            return {"users": users}
        if args.users_command == "add":
            user = auth.add_user(args.username, _read_password(args), is_admin=args.admin)
            if not args.json:
                out.write(f"created user {user.username}\n")
            return {"user": user.to_dict()}
        if args.users_command == "passwd":
            auth.set_password(args.username, _read_password(args))
            if not args.json:
                out.write(f"password changed for {args.username}\n")
            return {"user": auth.get(args.username).to_dict()}
        if args.users_command == "handover":
            source = auth.local_user() if args.from_user == LOCAL_USER else auth.get(args.from_user)
            given = ctx.documents.hand_over(source.id, auth.get(args.username).id)
            if not args.json:
                out.write(
                    f"gave {len(given['documents'])} document(s) and {len(given['conversations'])} "
                    f"conversation(s) of {source.username} to {args.username}"
                    + (f"; {len(given['kept_duplicates'])} already there stayed" if given["kept_duplicates"] else "")
                    + "\n"
                )
            return {"handed_over": given}
        user = auth.get(args.username)
        ctx.documents.purge_owner(user.id, lambda: auth.remove_user(args.username))
        if not args.json:
            out.write(f"removed user {args.username} and everything it owned\n")
        return {"removed": user.to_dict()}
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
