"""The arena in a real headless browser: Playwright driving Debian's chromium plays a two-turn session,
votes, ends it (names revealed) and sees the leaderboard update. Skips where chromium is not installed
(CI installs it: .ci/run). ARENA_SCREENSHOT=path.png saves a screenshot of the session page."""

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ARENA_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"browser test needs chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[arena]' for playwright")
from arena_util import live_server  # noqa: E402

from topocl.arena.app import ArenaSettings, create_app  # noqa: E402

NAMES = ("scripted-keeper", "scripted-forgetter")


def test_two_turn_session_in_chromium(tmp_path):
    app = create_app(ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", bootstrap_rounds=50))
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"{url}/leaderboard")
            assert page.inner_text("[data-testid=vote-total]").startswith("0 votes")
            page.goto(url)
            page.click("[data-testid=start]")
            page.wait_for_selector("[data-testid=turn-form]")
            for idx, (text, outcome) in enumerate([("I draw my sword and greet the innkeeper.", "a"),
                                                   ("I ask who owns the moon bow.", "b")]):
                page.fill("[data-testid=turn-text]", text)
                page.click("[data-testid=send]")
                page.wait_for_selector("[data-testid=reply-a]")
                page.wait_for_selector("[data-testid=reply-b]")
                html = page.content()
                assert not any(n in html for n in NAMES)  # anonymous until the end
                if idx == 1 and os.environ.get("ARENA_SCREENSHOT"):
                    page.screenshot(path=os.environ["ARENA_SCREENSHOT"], full_page=True)
                page.click(f"[data-testid=vote-{outcome}]")
                page.wait_for_selector("[data-testid=turn-form]")
                assert page.locator("[data-testid=turn]").count() == idx + 1  # the story grew by one turn
            page.on("dialog", lambda d: d.accept())
            page.click("[data-testid=finish]")
            page.wait_for_selector("[data-testid=reveal]")
            assert {page.inner_text("[data-testid=model-a]"), page.inner_text("[data-testid=model-b]")} == set(NAMES)
            page.click("[data-testid=nav-leaderboard]")
            page.wait_for_selector("[data-testid=leaderboard]")
            assert page.inner_text("[data-testid=vote-total]").startswith("2 votes in 1 sessions")
            for n in NAMES:
                assert page.inner_text(f"[data-testid=votes-{n}]") == "2"
        finally:
            browser.close()
