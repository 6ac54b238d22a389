"""The run dir's pages opened in a real headless browser (Debian's chromium and chromium-driver,
driven by selenium): no console errors, the plot's points drawn, a screenshot written."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attn_search.search.loop import SearchOptions, run_search

TINY = str(Path(__file__).parent / "data" / "tiny.yaml")


def _binary(*names: str) -> str | None:
    return next((p for p in (shutil.which(n) for n in names) if p), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver = _binary("chromium", "chromium-browser", "google-chrome"), _binary("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no headless browser here: install Debian's chromium and chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "run"
    run_search(SearchOptions(space=TINY, trials=6, steps=6, confirm=0, out=str(out), quiet=True))
    return out


def _errors(browser: Any) -> list[dict[str, Any]]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_the_interactive_front_draws_every_complete_trial_and_the_chosen_point(
    browser: Any, run_dir: Path, tmp_path: Path
) -> None:
    import pandas as pd
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get((run_dir / "pareto.html").as_uri())
    count = "return document.querySelectorAll('.scatterlayer .trace .points path.point').length"
    # plotly draws after the page loads (seconds on a busy machine): wait for its markers, then count
    WebDriverWait(browser, 60).until(lambda b: b.execute_script(count) > 0)
    points = browser.execute_script(count)
    complete = int((pd.read_csv(run_dir / "trials.csv")["state"] == "complete").sum())
    assert points == complete + 1, "one marker per complete trial, plus the chosen point's star"
    names = browser.execute_script(
        "return Array.from(document.querySelectorAll('.legendtext')).map(e => e.textContent)"
    )
    assert "chosen" in names and "Pareto front" in names
    assert _errors(browser) == []
    browser.save_screenshot(str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_the_report_shows_its_pictures_without_console_errors(browser: Any, run_dir: Path, tmp_path: Path) -> None:
    browser.get((run_dir / "report.html").as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])"
    )
    assert {alt for alt, _ in images} >= {"pareto.png", "pattern.png", "hypervolume.png"}
    assert all(loaded for _, loaded in images), images
    text = browser.find_element("tag name", "body").text
    assert "Chosen configuration" in text and "Pareto front" in text
    assert _errors(browser) == []
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000
