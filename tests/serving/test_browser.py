"""The web page at ``/``, driven in a real headless Chromium through Playwright.

Needs Debian's ``chromium`` (``/usr/bin/chromium``); skipped, with the reason shown in
the test summary, where it is absent. ``.ci/run`` installs it.
"""

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from twostage.recommender import Recommender
from twostage.serving import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Chromium is not installed (apt-get install chromium chromium-driver)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(models_dir: Path) -> Iterator[str]:
    app = create_app(ServeSettings(models=str(models_dir), poll_seconds=0))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_page_shows_history_recommendations_and_similar_items(
    server: str, small_recommender: Recommender
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/")
            page.wait_for_selector("#model option[value=synthetic]", state="attached")
            page.wait_for_function("document.querySelector('#user').value !== ''")
            page.fill("#user", "3")
            page.fill("#k", "5")
            page.click("#recommend")
            page.wait_for_selector("#recs li")

            expected = small_recommender.recommend(3, 5).items
            shown = page.eval_on_selector_all(
                "#recs li", "items => items.map(li => li.dataset.itemId)"
            )
            assert shown == [str(item["item_id"]) for item in expected]
            assert "personalised" in page.inner_text("#path")
            history = page.eval_on_selector_all("#history li", "items => items.length")
            assert history == len(small_recommender.history(3)) > 0

            page.click("#recs li >> nth=0")
            page.wait_for_selector("#similar li")
            similar = page.eval_on_selector_all(
                "#similar li", "items => items.map(li => li.dataset.itemId)"
            )
            wanted = small_recommender.similar_items(expected[0]["item_id"], 10)
            assert similar == [str(item["item_id"]) for item in wanted]

            # A new user described by features gets the cold-start answer.
            page.fill("#user", "")
            page.click("#features-box summary")
            page.fill("#features input[name=age]", "30")
            page.click("#recommend")
            page.wait_for_function(
                "document.querySelector('#path').textContent.includes('cold start')"
            )
            # A bad request shows the server's message instead of failing silently.
            page.fill("#k", "1000")
            page.click("#recommend")
            page.wait_for_selector("#error:not([hidden])")
            assert "`k` should be between 1 and 100" in page.inner_text("#error")
            assert errors == []
        finally:
            browser.close()
