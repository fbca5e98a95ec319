"""Long service calls run on a worker thread, so a Gradio generator can show their progress.

A service call that reports progress through a callback (`QAService.answer`'s `progress`, a state
built on first use) blocks the generator that calls it: the chat could say nothing until it returns.
`in_background` runs it on a thread and hands back, in order, its progress reports and what it yields.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = object()


class Progress(tuple):
    """One progress report: the arguments the work passed to its callback."""


def in_background(work: Callable[[Callable[..., None]], Iterable[Any]], name: str = "ui-work") -> Iterator[Any]:
    """Yields `Progress(args)` for each `report(*args)` of `work(report)` and every item it yields,
    in order; re-raises its exception here. The thread is a daemon: a page closed mid-answer lets it
    finish its work (stored as usual) without anyone reading."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for item in work(lambda *args: events.put(Progress(args))):
                events.put(("item", item))
            events.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who re-raises it
            events.put(exc)

    threading.Thread(target=run, daemon=True, name=name).start()
    while (event := events.get()) is not _DONE:
        if isinstance(event, BaseException):
            raise event
        yield event if isinstance(event, Progress) else event[1]
