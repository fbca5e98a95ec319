"""The `sharedllm` command: the scriptable face of the app (DESIGN section 6).

Every command takes `--data-dir` and `--model` (before or after the command name). With `--json` a
command prints exactly one JSON document on stdout; logs and progress bars go to stderr. Errors exit
non-zero with a one-line reason on stderr (and `{"error": "..."}` on stdout under `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
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
            emit_json(payload, real_stdout)
        return EXIT_ERROR
    if as_json and result is not None:
        emit_json(result, real_stdout)
    return 0


def _dispatch(args: argparse.Namespace, out: TextIO) -> Any:
    from app.config import Settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir, "model": args.model, "device": args.device}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port)
    settings = Settings.load(overrides)
    from app import cli_commands

    handler = getattr(cli_commands, f"cmd_{args.command}")
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


def emit_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
