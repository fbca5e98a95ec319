"""Child-process side of PDF extraction: `python -m app.pdf_worker PATH --max-pages N --memory-bytes B`.

It runs in its own process because pypdf parses hostile input: the address-space limit is set
before pypdf is imported, so a decompression bomb ends in MemoryError here instead of swapping the
server, and the parent can kill a hung parse. It writes JSON lines to stdout:
`{"progress": [done, total]}` per page, then one `{"result": {...}}`. Imports nothing of the project
except app.pdf_text (stdlib only) to keep start-up cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peak_rss_kb() -> int:
    """Peak resident memory of this process image. ru_maxrss would also count the parent's peak
    from before exec (Linux keeps it across fork+exec), so prefer VmHWM, which is per image."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _result(status: str, reason: str | None = None, pages: list[str] | None = None, n_pages: int = 0) -> dict:
    maxrss_kb = _peak_rss_kb()
    return {"status": status, "reason": reason, "pages": pages or [], "n_pages": n_pages, "maxrss_kb": maxrss_kb}


def _over_decompression_limit(page) -> bool:
    """pypdf's text extraction swallows its own decompression limit and returns no text: an empty
    page is asked once more, directly, whether its content stream is over the limit."""
    from pypdf.errors import LimitReachedError

    try:
        page.get_contents()
    except LimitReachedError:
        return True
    except Exception:  # anything else broken about an empty page is not a bomb
        return False
    return False


def extract(path: str, max_pages: int) -> dict:
    """Open, decrypt with the empty password if needed, extract and normalise every page."""
    from pypdf import PasswordType, PdfReader
    from pypdf._configuration import get_configuration
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PdfReadError

    from app.pdf_text import has_text, normalise_pages

    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            try:
                if reader.decrypt("") == PasswordType.NOT_DECRYPTED:
                    return _result("needs_password", "encrypted: the PDF needs a password to open")
            except DependencyError as exc:
                return _result("failed", f"encrypted with an unsupported algorithm: {exc}")
        n_pages = len(reader.pages)
    except FileNotDecryptedError:
        return _result("needs_password", "encrypted: the PDF needs a password to open")
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        return _result("failed", f"corrupt PDF: {type(exc).__name__}: {exc}"[:500])
    if n_pages == 0:
        return _result("failed", "corrupt PDF: no pages")
    if n_pages > max_pages:
        return _result("failed", f"too large: {n_pages} pages (limit {max_pages})", n_pages=n_pages)
    raw: list[str] = []
    bad_pages = bombs = 0
    for index in range(n_pages):
        try:
            raw.append(reader.pages[index].extract_text() or "")
        except MemoryError:
            raise
        except LimitReachedError:
            raw.append("")
            bombs += 1
        except Exception as exc:  # one broken page must not lose the document
            logging.getLogger(__name__).warning("page %d: %s", index + 1, exc)
            raw.append("")
            bad_pages += 1
        else:
            bombs += not raw[-1].strip() and _over_decompression_limit(reader.pages[index])
        _emit({"progress": [index + 1, n_pages]})
    if bombs and not has_text(raw):
        limit_mb = get_configuration().zlib_maximum_output_length / 1e6
        return _result(
            "failed",
            f"decompression limit: {bombs} of {n_pages} page(s) hold a stream that decompresses to more than "
            f"{limit_mb:g} MB (a decompression bomb?); nothing was extracted",
            n_pages=n_pages,
        )
    if bad_pages == n_pages:
        return _result("failed", "corrupt PDF: no page could be read", n_pages=n_pages)
    pages = normalise_pages(raw)
    if not has_text(pages):
        return _result(
            "no_text_layer", "no text layer: the pages are images (a scan?); OCR is not supported", n_pages=n_pages
        )
    return _result("ok", None, pages, n_pages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--max-pages", type=int, default=5000)
    parser.add_argument("--memory-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    try:
        result = extract(args.path, args.max_pages)
    except (MemoryError, SystemError):  # SystemError: a C extension failing an allocation
        result = _result("failed", "out of memory: the PDF needs more than the extraction memory limit")
    except RecursionError:
        result = _result("failed", "corrupt PDF: nesting too deep")
    except Exception as exc:  # anything else pypdf raises on malformed input
        result = _result("failed", f"corrupt PDF: {type(exc).__name__}: {exc}"[:500])
    _emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
