"""The report page in a real browser (the tier `browser`): headless Chromium, Debian's chromium and chromium-driver
driven by selenium, network off. The map must draw (not blank, no console error) and its layer and step controls,
moved as a reader moves them (a click, arrow keys), must redraw exactly what metrics.json says for that choice.

Without chromium the tier is not run and says in one line what to install; under CI (the CI variable set, as
CI runs set it, and .ci/run installs chromium first) a missing browser is a failure, never a skip.
Set MINILM_SCREENSHOTS=DIR to keep the screenshots.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from map_fixture import LEVELS, MOVED, WORDS, write_map_page

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
INSTALL = "install Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):  # one line for the whole tier
    pytest.skip(f"browser tier not run: {INSTALL}", allow_module_level=True)

# Bokeh draws its widgets inside shadow roots: find an element by CSS selector (and text) through them.
FIND = """
function find(root, selector, text) {
  for (const el of root.querySelectorAll('*')) {
    if (el.matches(selector) && (text === null || el.textContent.trim() === text)) return el;
    if (el.shadowRoot) { const found = find(el.shadowRoot, selector, text); if (found) return found; }
  }
  return null;
}
return find(document, arguments[0], arguments[1]);
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):  # under CI: the tier's tests fail, the other tiers run on
        pytest.fail(f"the browser tier must run in CI: {INSTALL}", pytrace=False)
    from selenium import webdriver  # in the dev extras
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})  # network off: the page must need nothing from outside
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                                 "downloadThroughput": 0, "uploadThroughput": 0})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    path, metrics = write_map_page(tmp_path_factory.mktemp("report") / "report")
    browser.get(path.as_uri())
    wait_for(browser, "return window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
                      "Bokeh.documents[0].get_model_by_name('map-points-full').data.x.length > 0")
    return metrics["map"]


def wait_for(driver, script: str):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(script))


def drawn(driver, variant: str) -> dict:
    """What a panel's sources hold now: the points' places and the arrows."""
    return driver.execute_script(
        "const m = (k) => Bokeh.documents[0].get_model_by_name(`map-${k}-" + variant + "`).data;"
        "return {x: m('points').x, y: m('points').y, word: m('points').word, arrows: m('arrows').x1.length};")


def pixels(driver, name: str) -> np.ndarray:
    """The first panel's canvas as an RGB array (what is on screen), kept under MINILM_SCREENSHOTS if set."""
    from PIL import Image
    canvas = driver.execute_script(FIND, "canvas", None)
    png = canvas.screenshot_as_png
    if os.environ.get("MINILM_SCREENSHOTS"):
        Path(os.environ["MINILM_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(os.environ["MINILM_SCREENSHOTS"]) / f"{name}.png"))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# Where a word's dot is, in the canvas's pixels (Bokeh's own scales), and the text of any tooltip shown.
DOT = """
const view = Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(`map-panel-${arguments[0]}`));
const points = Bokeh.documents[0].get_model_by_name(`map-points-${arguments[0]}`).data, k = arguments[1];
return [view.frame.x_scale.compute(points.x[k]), view.frame.y_scale.compute(points.y[k])];
"""
TOOLTIPS = """
const texts = [], walk = (root) => { for (const el of root.querySelectorAll('*')) {
  if (String(el.className).includes('bk-tooltip-content')) texts.push(el.innerText);
  if (el.shadowRoot) walk(el.shadowRoot); } };
walk(document);
return texts.join('\\n');
"""


def check_points(driver, data: dict, level: str, step: int):
    for variant in data["variants"]:
        now = drawn(driver, variant)
        assert now["word"] == WORDS
        np.testing.assert_allclose(np.c_[now["x"], now["y"]], data["xy"][level][variant][step], atol=1e-9)


def test_the_map_draws_offline_without_console_errors(browser, page):
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    image = pixels(browser, "loaded")
    ink = np.any(image < 200, axis=-1).mean()  # share of pixels darker than the white background
    assert ink > 0.02 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank: dots, labels, hulls
    check_points(browser, page, LEVELS[-1], -1)  # opens at the last layer and the last step
    text = browser.execute_script("return Bokeh.documents[0].get_model_by_name('map-info').text")
    assert f"{100 * page['variance_share'][LEVELS[-1]]:.1f}%" in text and "w0–w1" in text


def test_hovering_a_word_shows_its_partner_cosines_and_neighbours_before_and_after(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = browser.execute_script(FIND, "canvas", None)  # the first panel: full
    x, y = browser.execute_script(DOT, "full", 1)  # w1, a planted mover, bound to w0
    ActionChains(browser).move_to_element_with_offset(canvas, round(x - canvas.rect["width"] / 2),
                                                      round(y - canvas.rect["height"] / 2)).perform()
    wait_for(browser, TOOLTIPS.replace("return texts", "return texts.length > 0 && texts"))
    tip = browser.execute_script(TOOLTIPS)
    cos = page["partner_cos"][LEVELS[-1]]["full"]
    near = [", ".join(WORDS[j] for j in page["neighbours"][LEVELS[-1]]["full"][s][1]) for s in (0, -1)]
    assert "w1 (concepts)" in tip and "w0 (bound)" in tip and f"{cos[0][1]:.3f} → {cos[-1][1]:.3f}" in tip
    assert near[0] in tip and near[1] in tip


def test_moving_the_layer_and_step_controls_redraws_what_metrics_json_says(browser, page):
    from selenium.webdriver.common.keys import Keys
    before = pixels(browser, "layer-2-step-20")
    browser.execute_script(FIND, "button", "static").click()  # the layer control, clicked
    wait_for(browser, "return Bokeh.documents[0].get_model_by_name('map-layer').active === 0")
    check_points(browser, page, "static", -1)
    # the planted moves: full moved two words at every level, lora left the static embedding alone
    assert drawn(browser, "full")["arrows"] == len(MOVED) and drawn(browser, "lora")["arrows"] == 0
    static = pixels(browser, "static-step-20")
    assert np.any(static != before)
    handle = browser.execute_script(FIND, ".noUi-handle", None)  # the step slider, by keyboard
    for _ in range(len(page["steps"]) - 1):
        handle.send_keys(Keys.ARROW_LEFT)
    wait_for(browser, "return Bokeh.documents[0].get_model_by_name('map-step').value === 0")
    check_points(browser, page, "static", 0)
    assert all(drawn(browser, v)["arrows"] == 0 for v in page["variants"])  # step 0 is the base: nothing moved
    assert "training step 0 of 20" in browser.execute_script(
        "return Bokeh.documents[0].get_model_by_name('map-step').title")
    assert np.any(pixels(browser, "static-step-0") != static)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
