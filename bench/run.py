"""What every benchmark receives: the loaded model, where to write, the command that reproduces the
run, and a helper that turns measured rows into a written section with plots."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import load_average, machine_label, model_label
from bench.report import Section, write_raw, write_section

log = logging.getLogger(__name__)


@dataclass
class Run:
    lm: Any
    command: str
    md_path: Path
    img_dir: Path
    raw_dir: Path
    work_dir: Path | None = None  # app data (SQLite, tensors) of the run; a temporary dir when None
    store_dir: Path | None = None  # app data kept between runs (ingested documents are reused)
    key_suffix: str = ""  # appended to section keys and figure names (e.g. "-smoke")
    max_new_tokens: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def machine(self) -> str:
        return machine_label(self.lm.device)

    def section(self, key: str, title: str) -> Section:
        return Section(key=key + self.key_suffix, title=title + (f" ({self.key_suffix.strip('-')})" if self.key_suffix else ""),
                       machine=self.machine, command=self.command, weights=model_label(self.lm),
                       started=time.strftime("%Y-%m-%d %H:%M", time.localtime()) + f", load average {load_average()}")

    def figure(self, name: str) -> Path:
        return self.img_dir / f"{name}{self.key_suffix}.png"

    def rel(self, path: Path) -> str:
        """Path of a figure relative to the Markdown file (for the image link)."""
        try:
            return str(Path(path).resolve().relative_to(self.md_path.resolve().parent))
        except ValueError:
            return str(Path(path).resolve())

    def scratch(self) -> tempfile.TemporaryDirectory:
        base = self.work_dir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="sharedllm-bench-", dir=base)

    def store(self):
        """The app data dir: `store_dir` when set (kept), else a temporary one."""
        import contextlib

        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            return contextlib.nullcontext(str(self.store_dir))
        return self.scratch()

    def write(self, section: Section, started: float) -> Section:
        section.wall_s = time.perf_counter() - started
        write_section(self.md_path, section)
        write_raw(self.raw_dir / f"{section.key}.json", section)
        return section
