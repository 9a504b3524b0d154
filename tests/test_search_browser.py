"""The search page in a real headless Chromium (Debian's chromium and chromedriver, driven by selenium).

Types a query, checks the result cards, clicks one and checks that the HTML5 player seeked to the moment's start.
Saves a screenshot of the results and of the player under the test's tmp path. Skipped only when chromium is
missing and PRVR_REQUIRE_BROWSER is unset (CI sets it, so there a missing browser fails).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.search.index import run_index
from stages.search.search import Searcher
from stages.search.server import make_server
from tests.test_search import CONFIG, FRAMES, make_videos, trained_choice

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
    "--autoplay-policy=no-user-gesture-required",
)


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator:
    paths = _browser_paths()
    if paths is None:
        if os.environ.get("PRVR_REQUIRE_BROWSER"):
            pytest.fail("PRVR_REQUIRE_BROWSER is set but chromium and chromedriver are not installed")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=paths[1]))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def page(tmp_path: Path, tiny_clip_weights: Path) -> Iterator[tuple[str, Searcher]]:
    """The URL of the page over a tiny ProPy index of real mp4s, and the index's searcher."""
    make_videos(tmp_path / "videos", (4, 5, 6, 7))
    choice = trained_choice(tmp_path, "propy", tiny_clip_weights)
    run_index(tmp_path / "videos", tmp_path / "index", choice, FRAMES, CONFIG)
    searcher = Searcher(tmp_path / "index", CONFIG)
    server = make_server(searcher, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", searcher
    finally:
        server.shutdown()
        server.server_close()


def test_search_page_plays_the_moment_in_chromium(browser, page: tuple[str, Searcher], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    url, searcher = page
    query = "a bright bar slides to the right"
    expected = searcher.search([query], top_k=3)[0]
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(ready.text_to_be_present_in_element((By.ID, "info"), "4 videos indexed with propy"))
    top_k = browser.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("3")
    browser.find_element(By.ID, "query").send_keys(query)
    browser.find_element(By.ID, "search").click()
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#results .card")) == 3)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert [card.get_attribute("data-video-id") for card in cards] == [hit.video_id for hit in expected]
    assert [float(card.get_attribute("data-start")) for card in cards] == [hit.start for hit in expected]
    assert all(card.find_element(By.TAG_NAME, "img").get_property("naturalWidth") > 0 for card in cards)
    assert "3 results" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "search_results.png"))

    chosen = max(range(3), key=lambda i: expected[i].start)  # a moment that does not start at 0
    start = expected[chosen].start
    assert start > 0
    cards[chosen].click()
    player = browser.find_element(By.ID, "player")
    wait.until(lambda driver: player.get_attribute("data-seeked-time") is not None)
    assert float(player.get_attribute("data-seeked-time")) == pytest.approx(start, abs=1e-3)
    wait.until(lambda driver: driver.execute_script("return arguments[0].readyState", player) >= 2)
    current = browser.execute_script("arguments[0].pause(); return arguments[0].currentTime", player)
    assert start - 1e-3 <= current <= expected[chosen].end + 2.0  # playing on from the moment
    assert browser.execute_script("return arguments[0].error", player) is None
    assert Path(expected[chosen].path).name == browser.find_element(By.ID, "player-title").text
    browser.save_screenshot(str(tmp_path / "search_player.png"))
    assert (tmp_path / "search_results.png").stat().st_size > 0 and (tmp_path / "search_player.png").stat().st_size > 0
