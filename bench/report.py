"""Writers: one Markdown section per benchmark in docs/benchmarks.md (replaced in place, keyed by the
benchmark's name), PNG plots in docs/img/, and the raw results as JSON.

Each section and figure names the machine, the weights and the exact command that reproduces it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEADER = """# Benchmarks

Measured by `bench/` (`python -m bench --help`, or `sharedllm bench`). Each section below is
rewritten in place by the run that produced it and says on which machine, with which weights and by
which exact command. Ratios (sharedllm / baseline) are computed pair by pair inside one run; figures
from different runs are never compared. The CPU machine is shared with other jobs, so absolute
times drift between runs; read the ratios.
"""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    title: str = ""

    def markdown(self) -> str:
        lines = []
        if self.title:
            lines += [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
        return "\n".join(lines)


@dataclass
class Section:
    key: str  # e.g. "speed"; the Markdown section with this key is replaced
    title: str
    machine: str
    command: str
    weights: str
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # paths relative to the Markdown file
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    wall_s: float = 0.0

    def markdown(self) -> str:
        out = [f"## {self.title}", "",
               f"- machine: {self.machine}",
               f"- model/weights: {self.weights}",
               f"- command: `{self.command}`",
               f"- run: {self.started}, {self.wall_s:.0f} s wall", ""]
        for table in self.tables:
            out += [table.markdown(), ""]
        for fig in self.figures:
            out += [f"![{Path(fig).stem}]({fig})", ""]
        for note in self.notes:
            out.append(f"- {note}")
        return "\n".join(out).rstrip() + "\n"


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2g}"
    return str(value).replace("|", "\\|")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"


def write_section(md_path: Path, section: Section) -> None:
    """Replaces the section keyed `section.key` in `md_path` (appends it when new)."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = md_path.read_text() if md_path.is_file() else HEADER
    start, end = _markers(section.key)
    block = f"{start}\n{section.markdown()}{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(text)
    log.info("wrote section %r of %s", section.key, md_path)


def write_raw(path: Path, section: Section) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(section)
    path.write_text(json.dumps(data, indent=1, default=str))


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str,
               series: dict[str, tuple[list[float], list[float]]], machine: str, command: str,
               weights: str = "", logx: bool = False, logy: bool = False) -> Path:
    """A line plot, footed with the machine, weights and the command that reproduces it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    foot = f"{machine}\n{weights}\n$ {command}" if weights else f"{machine}\n$ {command}"
    fig.text(0.01, 0.01, foot.replace("$ ", "> "), fontsize=6.5, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path
