"""The browser page at GET /: a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium) uploads an image, asks two questions and must show the API's answers and draw its masks.

Skips (never fails) when chromium, chromedriver or selenium is missing: `make test` tries to install the
browser with tools/ensure_chromium.sh. Screenshots go to the test's tmp_path and, when the environment
variable MEDISEE_TEST_ARTIFACTS is set, to that folder too; their paths are printed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medisee.data import phantom
from tests.serving.conftest import png_bytes

QUERIES = ["Segment the liver.", "Where is the spleen?"]
COLOURS = [(230, 60, 60), (60, 170, 230)]  # the page's first two query colours
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def browser_missing() -> str | None:
    missing = [
        name
        for name, found in (
            ("chromium", CHROMIUM),
            ("chromedriver", CHROMEDRIVER),
            ("selenium (pip)", importlib.util.find_spec("selenium")),
        )
        if not found
    ]
    if not missing:
        return None
    return (
        f"browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver "
        "(or tools/ensure_chromium.sh) and pip install selenium"
    )


pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100"):  # fmt: skip
        options.add_argument(arg)
    try:
        browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except WebDriverException as exc:  # a browser that is installed but cannot start here
        pytest.skip(f"headless chromium does not start: {exc.msg or exc}"[:400])
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture()
def screenshot(driver, tmp_path, capsys):
    """screenshot(name): saves the page to tmp_path (and MEDISEE_TEST_ARTIFACTS) and prints where."""

    def save(name: str) -> list[Path]:
        folders = [tmp_path]
        if os.environ.get("MEDISEE_TEST_ARTIFACTS"):
            folders.append(Path(os.environ["MEDISEE_TEST_ARTIFACTS"]))
        paths = []
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.png"
            driver.save_screenshot(str(path))
            paths.append(path)
        with capsys.disabled():
            print(f"\n[screenshot] {name}: {', '.join(map(str, paths))}")
        return paths

    return save


def canvas_pixels(driver, element_id: str) -> np.ndarray:
    url = driver.execute_script(f"return document.getElementById('{element_id}').toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def b64_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def box_band(box, shape, width: int = 2) -> np.ndarray:
    """Pixels within `width` of a box's outline (the page strokes the box there)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    x1, y1, x2, y2 = box
    near_x = (np.abs(xx - x1) <= width) | (np.abs(xx - x2) <= width)
    near_y = (np.abs(yy - y1) <= width) | (np.abs(yy - y2) <= width)
    inside_x = (xx >= x1 - width) & (xx <= x2 + width)
    inside_y = (yy >= y1 - width) & (yy <= y2 + width)
    return (near_x & inside_y) | (near_y & inside_x)


def open_page(driver, served, image_path: Path | None, queries: list[str], key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(served.url + "/")
    assert driver.title == "MediSee"
    if image_path is not None:
        driver.find_element(By.ID, "image-input").send_keys(str(image_path))
    driver.find_element(By.ID, "queries").send_keys("\n".join(queries))
    driver.find_element(By.ID, "api-key").send_keys(key)
    driver.find_element(By.ID, "submit").click()


def wait_for(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def error_text(driver) -> str:
    return driver.execute_script(
        "const e = document.getElementById('error');return e.classList.contains('shown') ? e.textContent : ''"
    )


def test_page_shows_answers_and_draws_masks(served, driver, tmp_path, screenshot):
    from selenium.webdriver.common.by import By

    image = phantom.generate(seed=1, index=0, size=128)[0]
    image_path = tmp_path / "phantom.png"
    image_path.write_bytes(png_bytes(image))

    # the same question to the API directly: what the page must show and draw
    response = httpx.post(
        served.url + "/v1/segment",
        files={"image": ("phantom.png", png_bytes(image), "image/png")},
        data={"query": QUERIES, "mask_format": "png", "heatmap": "true"},
        headers=served.headers(),
        timeout=120,
    )
    assert response.status_code == 200, response.text
    expected = response.json()["results"]

    open_page(driver, served, image_path, QUERIES, served.key)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result-row")) == 2 or error_text(d))
    assert error_text(driver) == ""
    wait_for(driver, lambda d: "answer(s)" in d.find_element(By.ID, "status").text, timeout=30)
    screenshot("page_results")

    rows = driver.find_elements(By.CSS_SELECTOR, "tr.result-row")
    for row, want in zip(rows, expected, strict=True):
        cell = {name: row.find_element(By.CSS_SELECTOR, f"td.{name}").text for name in
                ("query", "answer", "verdict", "decided-by", "strength", "compactness", "purity",
                 "mask-score")}  # fmt: skip
        assert cell["query"] == want["query"]
        assert cell["answer"] == want["answer"]
        assert cell["verdict"] == want["verdict"] and want["verdict"] in ("present", "absent", "uncertain")
        assert cell["decided-by"] == want["decided_by"]
        for name, value in (("strength", want["scores"]["strength"]),
                            ("compactness", want["scores"]["compactness"]),
                            ("purity", want["scores"]["purity"]),
                            ("mask-score", want["decoder"]["mask_score"])):  # fmt: skip
            if value is None:
                assert cell[name] == "–"
            else:
                assert float(cell[name]) == pytest.approx(value, abs=1.5e-3)

    # the main canvas: the image, each mask tinted with its query's colour, boxes outlined
    canvas = canvas_pixels(driver, "canvas")
    assert canvas.shape == (*image.shape, 3)
    want = np.repeat(image[..., None].astype(np.float32), 3, axis=2)
    any_mask = np.zeros(image.shape, bool)
    band = np.zeros(image.shape, bool)
    for result, colour in zip(expected, COLOURS, strict=True):
        if result["mask"] is not None:
            assert result["mask"]["format"] == "png"
            mask = b64_png(result["mask"]["png"]) > 127
            assert mask.shape == image.shape and mask.sum() == result["mask_area"]
            want[mask] = 0.55 * want[mask] + 0.45 * np.asarray(colour, np.float32)
            any_mask |= mask
        if result["box"] is not None:
            band |= box_band(result["box"], image.shape)
    masks_seen = any_mask & ~band
    plain = ~any_mask & ~band
    assert np.abs(canvas[plain] - want[plain]).max() <= 2, "the image is not drawn unchanged outside masks"
    if masks_seen.any():
        assert np.abs(canvas[masks_seen] - want[masks_seen]).max() <= 2, "masks not tinted as returned"
        tinted = canvas.max(axis=2) - canvas.min(axis=2) > 20
        assert tinted[masks_seen].all() and not tinted[plain].any()
    else:  # nothing segmented: nothing tinted off the box outlines
        assert not (canvas.max(axis=2) - canvas.min(axis=2) > 20)[plain].any()
    drawn = {}  # box -> the colour on top (a later query's identical box is drawn over an earlier one)
    for result, colour in zip(expected, COLOURS, strict=True):
        if result["box"] is not None:
            drawn[tuple(round(v) for v in result["box"])] = colour
    for (x1, y1, x2, y2), colour in drawn.items():
        outline = np.zeros((image.shape[0] + 1, image.shape[1] + 1), bool)  # x2/y2 may be the image size
        outline[y1, x1 : x2 + 1] = outline[y2, x1 : x2 + 1] = True
        outline[y1 : y2 + 1, x1] = outline[y1 : y2 + 1, x2] = True
        outline = outline[: image.shape[0], : image.shape[1]]
        on_colour = np.abs(canvas[outline] - np.asarray(colour, np.float32)).max(axis=1) <= 2
        assert on_colour.mean() > 0.9, f"box {(x1, y1, x2, y2)} not outlined in {colour}"
    print(f"mask pixels checked: {int(masks_seen.sum())}, plain pixels: {int(plain.sum())}")

    # the heatmap canvas: the first query's heatmap, toggled by the checkbox, the second on a row click
    heat = canvas_pixels(driver, "heatmap-canvas")
    assert heat.shape == canvas.shape
    if "heatmap_png" in expected[0]:
        value = b64_png(expected[0]["heatmap_png"]).astype(np.float32) * 3
        hot = np.stack([np.minimum(value, 255), np.clip(value - 255, 0, 255), np.maximum(value - 510, 0)], -1)
        gray = np.repeat(image[..., None].astype(np.float32), 3, axis=2)
        assert np.abs(heat - (0.5 * gray + 0.5 * hot)).max() <= 2
    toggle = driver.find_element(By.ID, "show-heatmap")
    heatmap_canvas = driver.find_element(By.ID, "heatmap-canvas")
    assert heatmap_canvas.is_displayed()
    toggle.click()
    assert not heatmap_canvas.is_displayed()
    toggle.click()
    assert heatmap_canvas.is_displayed()
    rows[1].click()
    wait_for(driver, lambda d: "selected" in rows[1].get_attribute("class"), timeout=10)
    assert "selected" not in rows[0].get_attribute("class")
    if expected[0].get("heatmap_png") != expected[1].get("heatmap_png"):
        wait_for(driver, lambda d: np.abs(canvas_pixels(d, "heatmap-canvas") - heat).max() > 0, timeout=10)
    screenshot("page_second_heatmap")


def test_page_shows_the_servers_401_message(served, driver, tmp_path, screenshot):
    from selenium.webdriver.common.by import By

    image_path = tmp_path / "phantom.png"
    image_path.write_bytes(png_bytes(phantom.generate(seed=1, index=0, size=128)[0]))
    open_page(driver, served, image_path, QUERIES, "wrong-key")
    message = wait_for(driver, error_text, timeout=60)
    screenshot("page_wrong_key")
    assert "401" in message and "missing or wrong API key" in message
    assert driver.find_element(By.ID, "error").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, ".result-row") == []
    assert driver.find_element(By.ID, "submit").is_enabled()


def test_page_asks_for_an_image_before_posting(served, driver):
    open_page(driver, served, None, QUERIES, served.key)
    assert "Choose an image file" in wait_for(driver, error_text, timeout=10)
