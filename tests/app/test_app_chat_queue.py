"""Issue 14, defect 5, through the running server as the page drives it: a second question typed
while an answer streams is queued and answered after it, in the same conversation, and the first
answer stays."""

from __future__ import annotations

from app_testkit import UiSession, launch_app


def test_question_asked_while_an_answer_streams_is_answered_next(ctx, make_doc):
    owner = ctx.auth.local_user().id
    doc = make_doc(owner)
    demo, url = launch_app(ctx)
    try:
        page = UiSession(url)
        assert page.event("sidebar", None)["success"]
        settings = ["sharedllm", 512, 0.0]  # a long answer from the tiny model: time to type another question
        assert page.event("take_question", "What is the annual fee?")["success"]
        first = page.start("ask_1", None, [doc], *settings)
        results, take, second = {}, None, None
        for message in page.messages():  # one event stream for the page, as the browser has
            if message.get("event_id") == first and message.get("msg") == "process_generating" and take is None:
                # the first answer is streaming: the user presses Enter on a second question
                take = page.start("take_question_1", "And the notice period?")
                second = page.start("ask_2", None, [doc], *settings)
            if message.get("msg") == "process_completed":
                results[message["event_id"]] = message
                if second is not None and {first, take, second} <= set(results):
                    break
        taken = results[take]
        assert taken["success"] and taken["output"]["data"][0] == ""  # the box is cleared...
        assert "And the notice period?" in taken["output"]["data"][1]  # ...and the question shown as queued
        assert results[first]["success"] and results[second]["success"]
        [conv] = ctx.conversations.list(owner)
        messages = ctx.conversations.messages(owner, conv["id"])
        assert [(m["role"], m["text"] if m["role"] == "user" else bool(m["text"])) for m in messages] == [
            ("user", "What is the annual fee?"), ("assistant", True),
            ("user", "And the notice period?"), ("assistant", True),
        ]
        chat = results[second]["output"]["data"][0]
        assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
        first_answer = " ".join(p.get("text", "") for p in chat[1]["content"]) if isinstance(
            chat[1]["content"], list) else chat[1]["content"]
        assert first_answer.strip() and messages[1]["text"][:20] in first_answer  # the first answer stays
    finally:
        demo.close()
