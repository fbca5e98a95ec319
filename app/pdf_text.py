"""Normalisation of text extracted from PDF pages.

Pure functions (stdlib only) so the extraction child process can import them cheaply and tests can
call them directly. The rules are conservative because contracts live on numbers: digits, clause
numbers ("12.3(b)") and number ranges are never joined, dropped or rewritten, except a line that is
a running header/footer (it repeats at the same margin on most pages, page numbers included).
"""

from __future__ import annotations

import math
import re

_LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb06": "st"}
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
# A word broken at a line end: letter, hyphen, newline, lower-case letter. Digits never qualify, so
# "10-\n20" (a range) and "Section 4-\nA" stay as they are.
_HYPHENATION = re.compile(r"(?<=[^\W\d_])-\n(?=[a-z])")
_MARGIN_LINES = 2  # how many lines at the top and bottom of a page can be a running header/footer
_NUMBER = re.compile(r"\d+")
_PAGE_WORDS = re.compile(r"\b(page|pages|pg|p\.|seite|página|pagina|pagina|side|sida|strona)\b|# ?(/|of|von|de|sur) ?#")


def clean_whitespace(text: str) -> str:
    """Unify spaces and line ends, drop soft hyphens and zero-width characters, expand ligatures."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00ad", "").replace("\u200b", "")
    for ligature, plain in _LIGATURES.items():
        text = text.replace(ligature, plain)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def join_hyphenated(text: str) -> str:
    """Undo line-end hyphenation ("agree-\\nment" -> "agreement")."""
    return _HYPHENATION.sub("", text)


def _margin_key(line: str) -> str:
    return _NUMBER.sub("#", line.strip().lower())


def _counts_pages(hits: list[tuple[int, str]]) -> bool:
    """True when one number in each line is the page index plus a common offset (a page number)."""
    offsets: dict[int, int] = {}
    for index, line in hits:
        for offset in {int(n) - index for n in _NUMBER.findall(line)}:
            offsets[offset] = offsets.get(offset, 0) + 1
    return bool(offsets) and max(offsets.values()) >= 0.8 * len(hits)


def _margin_size(lines: list[str]) -> int:
    """Lines at each end that may be header/footer; short pages keep most of their lines as body."""
    return max(0, min(_MARGIN_LINES, (len(lines) - 1) // 2))


def _repeated_keys(pages_lines: list[list[str]], top: bool) -> set[str]:
    n_pages = len(pages_lines)
    threshold = max(3, math.ceil(0.5 * n_pages))
    seen: dict[str, list[tuple[int, str]]] = {}
    for index, lines in enumerate(pages_lines):
        m = _margin_size(lines)
        margin = (lines[:m] if top else lines[len(lines) - m :]) if m else []
        for key, line in {_margin_key(line): line for line in margin}.items():
            seen.setdefault(key, []).append((index, line))
    keys = set()
    for key, hits in seen.items():
        if len(hits) < threshold:
            continue
        if not re.search(r"[^\W\d_]", key.replace("#", "")):
            # No letters ("3", "- 3 -", "3/40"): a page number only if it counts with the pages;
            # a clause number ("1.") repeated at the top of pages is content, not a header.
            if not _counts_pages(hits):
                continue
        elif len({line for _, line in hits}) > 1 and not (_PAGE_WORDS.search(key) and _counts_pages(hits)):
            # Same words, different numbers: only a running line when it names the page
            # ("Page 3 of 40"); "Section 3" at the top of page 3 is a heading and stays.
            continue
        keys.add(key)
    return keys


def strip_running_margins(pages: list[str]) -> list[str]:
    """Remove header/footer lines that repeat (digits aside) at the top or bottom of most pages."""
    if len(pages) < 3:
        return pages
    pages_lines = [[line for line in page.split("\n") if line.strip()] for page in pages]
    top_keys = _repeated_keys(pages_lines, top=True)
    bottom_keys = _repeated_keys(pages_lines, top=False)
    if not top_keys and not bottom_keys:
        return pages
    out = []
    for page, lines in zip(pages, pages_lines):
        start, end, m = 0, len(lines), _margin_size(lines)
        while start < m and _margin_key(lines[start]) in top_keys:
            start += 1
        while end > max(start, len(lines) - m) and _margin_key(lines[end - 1]) in bottom_keys:
            end -= 1
        out.append(_drop_margin_lines(page, start, len(lines) - end))
    return out


def _drop_margin_lines(page: str, n_top: int, n_bottom: int) -> str:
    """Drop the first n_top and last n_bottom non-empty lines, keeping blank lines between the rest."""
    if not n_top and not n_bottom:
        return page
    all_lines = page.split("\n")
    filled = [i for i, line in enumerate(all_lines) if line.strip()]
    drop = set(filled[:n_top]) | set(filled[len(filled) - n_bottom :] if n_bottom else [])
    kept = "\n".join(line for i, line in enumerate(all_lines) if i not in drop)
    return re.sub(r"\n{3,}", "\n\n", kept).strip()


def normalise_pages(pages: list[str]) -> list[str]:
    """The full pipeline, page by page; page count and order are preserved."""
    cleaned = [clean_whitespace(page) for page in pages]
    return [join_hyphenated(page) for page in strip_running_margins(cleaned)]


def has_text(pages: list[str]) -> bool:
    """True when any page has a letter or digit (an image-only scan has none)."""
    return any(any(ch.isalnum() for ch in page) for page in pages)
