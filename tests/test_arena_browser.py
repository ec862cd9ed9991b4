"""The arena in a real headless browser: Playwright driving Debian's chromium plays a two-turn session,
votes, ends it (names revealed) and sees the leaderboard update; a phone-sized viewport checks the layout.
Skips where chromium is not installed (CI installs it: .ci/run). ARENA_SCREENSHOT=path.png saves a
screenshot of the session page; ARENA_SCREENSHOT_DIR=dir keeps the phone screenshots (else tmp_path)."""

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
            assert page.inner_text("[data-testid=vote-total]").startswith("2 votes in 1 session.")
            for n in NAMES:
                assert page.inner_text(f"[data-testid=leaderboard-votes-{n}]") == "2"
        finally:
            browser.close()


PHONE = {"width": 390, "height": 844}  # an iPhone 12/13/14 in CSS pixels


def box(page, selector):
    return page.locator(selector).first.bounding_box()


def test_phone_viewport_layout(tmp_path):
    """On a phone: a typed premise selects "My own premise", the two replies stack, the leaderboard fits its
    card, "1 session" is singular, a one-session interval says so, and the favicon loads."""
    shots = Path(os.environ.get("ARENA_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    app = create_app(ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", bootstrap_rounds=20))
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
            page = ctx.new_page()
            page.set_default_timeout(20_000)
            missing = []
            page.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
            page.goto(url)
            assert page.is_checked("input[value='campaign:0']")
            page.fill("textarea[name=premise]", "A lighthouse keeper on a storm-bound island.")
            assert page.is_checked("input[value=custom]")  # typing chose "My own premise"
            page.screenshot(path=str(shots / "phone-start.png"), full_page=True)
            page.click("[data-testid=start]")
            page.wait_for_selector("[data-testid=turn-form]")
            assert "storm-bound island" in page.inner_text(".premise")
            page.fill("[data-testid=turn-text]", "I climb the stairs and light the lamp.")
            page.click("[data-testid=send]")
            page.wait_for_selector("[data-testid=reply-b]")
            a, b = box(page, "[data-testid=reply-a]"), box(page, "[data-testid=reply-b]")
            assert b["y"] >= a["y"] + a["height"] - 1  # stacked, not side by side
            assert a["width"] > 0.75 * PHONE["width"] and b["width"] > 0.75 * PHONE["width"]
            page.screenshot(path=str(shots / "phone-turn.png"), full_page=True)
            page.click("[data-testid=vote-a]")
            page.wait_for_selector("[data-testid=turn-form]")
            page.on("dialog", lambda d: d.accept())
            page.click("[data-testid=finish]")
            page.wait_for_selector("[data-testid=reveal]")
            page.goto(f"{url}/leaderboard")
            assert page.inner_text("[data-testid=vote-total]") == "1 vote in 1 session."
            card, table = box(page, "section.card"), box(page, "[data-testid=leaderboard]")
            assert table["x"] >= card["x"] and table["x"] + table["width"] <= card["x"] + card["width"]
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scroll
            for n in NAMES:
                assert page.inner_text(f"[data-testid=leaderboard-ci-{n}]") == "needs ≥ 2 sessions"
            page.screenshot(path=str(shots / "phone-leaderboard.png"), full_page=True)
            icon = page.evaluate("fetch('/favicon.ico').then(r => [r.status, r.headers.get('content-type')])")
            assert icon[0] == 200 and icon[1].startswith("image/svg+xml")
            assert not missing, missing  # no 404 for anything the pages asked for
        finally:
            browser.close()


def learner_specs(tmp_path: Path) -> list:
    """A surgery learner and its context-only twin: tiny in-process Llamas (context_turns 1, a round after
    every turn), or with ARENA_LEARNER_PRESET=NAME the surgery and context-only game masters of
    configs/arena/NAME.yaml (e.g. smollm2, outside CI)."""
    from topocl.arena.cli import PRESETS
    from topocl.arena.serving import ModelSpec, load_specs

    preset = os.environ.get("ARENA_LEARNER_PRESET", "")
    if preset:
        specs = load_specs(PRESETS / f"{preset}.yaml")
        return [next(s for s in specs if s.arm == arm) for arm in ("surgery", "none")]
    from arena_util import tiny_hf_dir

    llama = tiny_hf_dir(tmp_path / "llama", heads=4, kv_heads=2, hidden=32)
    common = {"path": str(llama), "context_turns": 1, "max_new_tokens": 8, "temperature": 0.0}
    return [ModelSpec("surgery-learner", "learner", arm="surgery", learn_every=1, learn_steps=2, lr=1e-2,
                      learn_batch=2, learn_seq_len=16, **common),
            ModelSpec("context-only", "learner", arm="none", **common)]


def test_learner_session_past_the_context_window(tmp_path):
    """A surgery learner and its context-only twin (`learner_specs`): K + 2 turns (past the context window
    of K turns), votes, the end; the revealed page logs the learning rounds, the learning step of each reply
    after the first round and the recall proxy per reply. ARENA_SCREENSHOT_DIR keeps learner-session.png."""
    specs = learner_specs(tmp_path)
    learner = specs[0]
    turns = learner.context_turns + 2
    slow = bool(os.environ.get("ARENA_LEARNER_PRESET"))  # a real model on CPU: replies and rounds take seconds
    app = create_app(ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", specs=specs, bootstrap_rounds=20))
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(600_000 if slow else 30_000)
            page.goto(url)
            page.click("[data-testid=start]")
            for idx in range(turns):
                page.wait_for_selector("[data-testid=turn-form]")
                page.fill("[data-testid=turn-text]", f"Turn {idx}: who holds the sword now?")
                page.click("[data-testid=send]")
                page.wait_for_selector("[data-testid=reply-b]")
                assert "learner" not in page.content() and "context-only" not in page.content()
                page.click("[data-testid=vote-tie]")
                assert app.state.pool.wait_idle(1800 if slow else 60)  # this turn's round, if one is due
            page.on("dialog", lambda d: d.accept())
            page.click("[data-testid=finish]")
            page.wait_for_selector("[data-testid=learning]")
            assert page.locator("[data-testid=learn-row]").count() == turns // learner.learn_every
            metas = [m.inner_text() for m in page.locator("[data-testid=turn-meta]").all()]
            assert len(metas) == turns and all("recall A" in m for m in metas)
            first = learner.learn_every  # replies written before the first round have no learning step
            assert not any("learning step" in m for m in metas[:first])
            assert all("learning step" in m for m in metas[first:])
            page.screenshot(path=str(Path(os.environ.get("ARENA_SCREENSHOT_DIR", tmp_path)) / "learner-session.png"),
                            full_page=True)
        finally:
            browser.close()
