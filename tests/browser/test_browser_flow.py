"""End to end in a real browser: log in, upload a multi-page PDF, watch it become ready, ask, see the
streamed answer with a page citation, view the page, export Markdown. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from app_testkit import CONTRACT_PAGES, launch_app, write_pdf  # noqa: E402

from app.config import Settings  # noqa: E402
from app.services.context import AppContext  # noqa: E402

pytestmark = pytest.mark.browser

USER, PASSWORD = "analyst", "analyst-password-1"
FEE_PAGE = 2  # CONTRACT_PAGES[1] holds the annual fee


@pytest.fixture
def server(tmp_path, default_model):
    settings = Settings.load({"data_dir": tmp_path / "data", "max_new_tokens": 16}, environ={})
    ctx = AppContext(settings, model=default_model)
    ctx.auth.add_user(USER, PASSWORD)
    demo, url = launch_app(ctx)
    yield ctx, url
    demo.close()
    ctx.close()


def test_login_upload_ask_cite_export(server, browser, artifacts_dir, tmp_path):
    ctx, url = server
    pdf = write_pdf(tmp_path / "service-agreement.pdf", CONTRACT_PAGES)
    broken = tmp_path / "scan-corrupt.pdf"
    broken.write_bytes(b"%PDF-1.4\n%% truncated upload")
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(60_000)
    try:
        page.goto(url)
        # log in (Gradio's login form)
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.get_by_text(f"Signed in as {USER}").wait_for()

        # upload: per-file progress ends in `ready`
        page.get_by_role("tab", name="Library").click()
        page.locator("#upload-files input[type=file]").set_input_files([str(pdf), str(broken)])
        page.locator("#upload-button").click()
        page.locator("#upload-progress tr[data-status=ready]").wait_for(timeout=180_000)
        page.locator("#upload-progress tr[data-status=failed]").wait_for(timeout=60_000)
        good = page.locator("#upload-progress tr[data-status=ready]").inner_text()
        bad = page.locator("#upload-progress tr[data-status=failed]").inner_text()
        assert (
            "service-agreement.pdf" in good
            and "scan-corrupt.pdf" in bad
            and len(bad) > len("scan-corrupt.pdf failed")
        )
        expect(page.locator("#library-table")).to_contain_text("service-agreement.pdf")
        page.screenshot(path=str(artifacts_dir / "browser-library.png"), full_page=True)

        # ask about it
        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-documents").get_by_text("service-agreement.pdf").click()
        page.locator("#question textarea").fill("What is the annual fee?")
        # record the chat's text as it changes, to prove the answer arrives in pieces
        page.evaluate("""() => {
            window.__chatLengths = [];
            const bot = document.querySelector('#chatbot');
            new MutationObserver(() => window.__chatLengths.push(bot.innerText.length))
                .observe(bot, {subtree: true, childList: true, characterData: true});
        }""")
        page.locator("#ask-button").click()
        bot = page.locator("#chatbot")
        bot.get_by_text("Sources").wait_for(timeout=180_000)
        text = bot.inner_text()
        lengths = page.evaluate("window.__chatLengths")
        assert len(set(lengths)) >= 3, f"answer did not stream: {lengths}"
        assert "What is the annual fee?" in text
        cited_pages = [int(n) for n in re.findall(r"service-agreement\.pdf, p\. (\d+)", text)]
        assert cited_pages, text
        page.locator("#answer-stats").get_by_text("first token").wait_for()

        # view a cited page's text
        page.locator("#page-viewer").get_by_text("View a cited page").click()
        page.locator("#cited-page input").click()
        page.get_by_role("option", name=re.compile(rf"p\. {cited_pages[0]}$")).click()
        expected = CONTRACT_PAGES[cited_pages[0] - 1].split(".")[0]
        page.wait_for_function(
            "([sel, want]) => document.querySelector(sel).value.includes(want)",
            arg=["#page-text textarea", expected],
        )

        # export Markdown
        page.locator("#export-md").click()
        link = page.locator("#export-file a").first
        link.wait_for()
        with page.expect_download() as download_info:
            link.click()
        exported = Path(download_info.value.path()).read_text()
        assert "What is the annual fee?" in exported and "service-agreement.pdf, p. " in exported
        page.screenshot(path=str(artifacts_dir / "browser-chat.png"), full_page=True)
    finally:
        page.screenshot(path=str(artifacts_dir / "browser-last.png"), full_page=True)
        page.close()

    if FEE_PAGE not in cited_pages[:1]:
        lm = ctx.model()
        if ctx.settings.engine == "sharedllm" and (not lm.weights_trained or lm.weights_warning):
            pytest.xfail(
                f"citations {cited_pages} do not lead with page {FEE_PAGE}: the default SharedLLM weights are "
                f"{'untrained' if not lm.weights_trained else 'flagged: ' + lm.weights_warning}"
            )
        pytest.fail(f"expected the fee page {FEE_PAGE} to be cited first, got {cited_pages}")
