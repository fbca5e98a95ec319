"""The `sharedllm` commands, one function per command (`cmd_<name>(args, settings, out)`): the parser,
the entry point and the error handling are in app/cli.py, which dispatches here by name."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from app.cli import CliError, PartialFailure


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

