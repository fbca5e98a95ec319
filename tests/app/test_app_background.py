"""`in_background`: a blocking call's progress reports and items arrive in order, its error here."""

from __future__ import annotations

import pytest

from app.ui.background import Progress, in_background


def test_reports_and_items_arrive_in_order_and_an_error_is_raised_to_the_reader():
    def work(report):
        report("merge", 1, 2)
        yield "a"
        report("merge", 2, 2)
        yield ("item", "b")  # an item that looks like the internal wrapping stays an item

    events = list(in_background(work))
    assert events == [Progress(("merge", 1, 2)), "a", Progress(("merge", 2, 2)), ("item", "b")]
    assert isinstance(events[0], Progress) and not isinstance(events[1], Progress)

    def failing(report):
        yield 1
        raise ValueError("no such document")

    seen = []
    with pytest.raises(ValueError, match="no such document"):
        for event in in_background(failing):
            seen.append(event)
    assert seen == [1]
