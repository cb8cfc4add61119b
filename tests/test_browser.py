"""Drive the Studio page in headless Chromium through Playwright and save screenshots.

    python -m pytest -m browser tests/test_browser.py
    TENDIFF_SCREENSHOTS=docs/screenshots python -m pytest -m browser tests/test_browser.py  # refresh docs

Needs ``pip install playwright`` and a Chromium (``apt-get install chromium``; no browser download
is attempted). Skips only when those are missing or the MNIST checkpoints are not trained yet.
Screenshots go to ``$TENDIFF_SCREENSHOTS`` (default ``docs/_screens_tmp/``, ignored by git).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from conftest import missing_checkpoints  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("TENDIFF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("TENDIFF_SCREENSHOTS", ROOT / "docs" / "_screens_tmp"))
if not SHOTS.is_absolute():
    SHOTS = ROOT / SHOTS


@pytest.fixture(scope="module")
def server(app_url):
    return app_url


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as exc:  # a Chromium that cannot start here
            pytest.skip(f"Chromium cannot start: {exc}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server)
    page.wait_for_selector("#model-view img")
    page.wait_for_function("(document.querySelector('#progress')?.innerText || '').startsWith('Done')")  # on load
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield page
    page.close()


def shot(page, name: str, full_page: bool = True, close_toasts: bool = True) -> Path:
    # every image loaded, no stale error toast
    page.wait_for_function("[...document.images].filter(i => i.getBoundingClientRect().width > 0)"
                           ".every(i => i.complete && (i.naturalWidth > 0 || !i.src))")
    if not close_toasts:
        time.sleep(0.8)  # let the toast finish flying in
    if close_toasts:
        for close in page.locator("[data-testid=toast-close]").all():
            if close.is_visible():
                close.click()
        page.wait_for_function("!document.querySelector('[data-testid=toast-body]')", timeout=15_000)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    with Image.open(path) as im:
        assert im.width >= 1000 and im.height >= 600
    return path


def text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('#{elem_id} input[type=range]').value == '{value}'")


def choose(page, elem_id: str, shown: str) -> None:
    """Pick an option of a dropdown by its shown text."""
    page.click(f"#{elem_id} input")
    page.click(f"[role=option]:has-text('{shown}')")
    page.wait_for_function(f"document.querySelector('#{elem_id} input').value.startsWith({shown!r})")


def more_settings(page) -> None:
    """Open the accordion with the sampler, steps and seed (once; it stays open)."""
    if not page.locator("#method").is_visible():
        page.click("#more-settings .label-wrap, #more-settings button:has-text('More settings')")
        page.wait_for_selector("#method", state="visible")


def run_purify(page, timeout: float = 30.0) -> tuple[float, list[str]]:
    """Click Purify, watch the progress line, return (seconds to the final result, steps seen)."""
    before = text(page, "#progress")
    start = time.perf_counter()
    page.click("#purify-btn")
    seen: list[str] = []
    while time.perf_counter() - start < timeout:
        t = text(page, "#progress")
        if t != before and (not seen or seen[-1] != t):
            seen.append(t)
        if t.startswith("Done") and t != before:
            return time.perf_counter() - start, seen
        time.sleep(0.02)
    raise AssertionError(f"no final result after {timeout} s; saw {seen}")


def test_first_visit_shows_a_result_above_the_fold(browser, server):
    """At 1366x900 with no scroll and no click: the examples, the Purify button, and the default
    example's result (corrupted, purified, the three predictions) are on screen."""
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    try:
        page.set_default_timeout(60_000)
        page.goto(server)
        page.wait_for_function("(document.querySelector('#progress')?.innerText || '').startsWith('Done')")
        page.wait_for_selector("#pred-purified [data-testid=label-output-value], #pred-purified .output-class")
        for selector in ("#examples", "#purify-btn", "#corrupted img", "#pred-x0 img", "#pred-clean",
                         "#pred-corrupted", "#pred-purified"):
            box = page.locator(selector).first.bounding_box()
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= 900, (selector, box)
        shot(page, "00_first_visit", full_page=False)
    finally:
        page.close()


def test_phone_layout(browser, server):
    """At 390 px wide: the examples are thumbnails a finger can hit (5 a row, all 20 shown), the
    default result arrives, no error."""
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=3)
    try:
        page.set_default_timeout(60_000)
        page.goto(server)
        page.wait_for_function("(document.querySelector('#progress')?.innerText || '').startsWith('Done')")
        thumbs = page.locator("#examples button[aria-label^='Thumbnail']")
        assert thumbs.count() == 20
        widths = [thumbs.nth(i).bounding_box()["width"] for i in (0, 19)]
        assert min(widths) >= 50, widths
        last = thumbs.nth(19).bounding_box()
        gallery = page.locator("#examples").bounding_box()
        assert last["y"] + last["height"] <= gallery["y"] + gallery["height"] + 1  # not hidden behind a scroll
        assert not page.locator("[data-testid=toast-body]").count()
        shot(page, "12_phone", full_page=False)
    finally:
        page.close()


def test_a_click_streams_and_finishes(page):
    """The page shows the default seed's result on load; another seed is a new run, streamed step by step."""
    more_settings(page)
    seed = page.locator("#seed input")
    seed.fill("5")
    seed.press("Tab")
    time.sleep(0.5)
    seconds, seen = run_purify(page)
    steps = [s for s in seen if s.startswith("Step")]
    assert len(steps) >= 3, f"the steps did not stream: {seen}"  # frames arrive one by one
    print(f"default click: final result after {seconds:.2f} s in the browser")  # reported, not asserted
    page.wait_for_selector("#pred-purified .output-class, #pred-purified [data-testid=label-output-value]")
    page.wait_for_selector("#strip img")
    shot(page, "01_default_run")


def test_no_caption_covers_its_image(page):
    """Every picture's label sits above its image: the boxes do not overlap."""
    page.click("button[role=tab]:has-text('Purify')")
    for elem in ("input-image", "corrupted", "x-t", "pred-x0", "model-view", "strip", "spread-image", "perturbation"):
        page.wait_for_selector(f"#{elem} img")
        label = page.locator(f"#{elem} label[data-testid=block-label]").first.bounding_box()
        image = page.locator(f"#{elem} img").first.bounding_box()
        assert label["y"] + label["height"] <= image["y"] + 1, (elem, label, image)


def test_pick_example(page):
    page.click("#examples button[aria-label='Thumbnail 4 of 20']")  # the first "3" (row 1: one per class)
    page.wait_for_function("document.querySelector('#true-label input').value === '3'")
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('28x28 gray')")
    page.wait_for_function("document.querySelector('#t-star input[type=number]').value === '200'")
    src = page.locator("#input-image img").first.get_attribute("src")
    assert "mnist_3_0" in src
    shot(page, "02_pick_example")


def test_bad_upload_shows_a_message_and_the_app_keeps_working(page, tmp_path):
    clear = tmp_path / "transparent.png"
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(clear)
    page.click("#input-image button[aria-label='Clear']") if page.locator(
        "#input-image button[aria-label='Clear']").count() else None
    page.locator("#input-image input[type=file]").set_input_files(str(clear))
    page.wait_for_selector("text=transparent pixels")
    time.sleep(2)  # any repeated event would have added its toast by now
    toasts = " ".join(t.inner_text() for t in page.locator("[data-testid=toast-body]").all())
    assert toasts.count("transparent pixels") == 1, toasts  # one upload, one message
    # The model-input line no longer describes the previous image.
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('not usable')")
    shot(page, "03_bad_upload", full_page=False, close_toasts=False)
    page.click("#examples button[aria-label='Thumbnail 4 of 20']")
    page.wait_for_function("document.querySelector('#input-image img')?.src.includes('mnist_3_0')")
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('unchanged')")


def test_corrupt_with_pgd_states_the_threat_model(page):
    choose(page, "corruption", "PGD L-inf")
    page.wait_for_selector("#threat-line:has-text('the attack sees only the classifier')")
    before = page.evaluate("document.querySelector('#corrupted img')?.src || ''")
    more_settings(page)
    page.click("#corrupt-btn")
    page.wait_for_function(f"(document.querySelector('#corrupted img')?.src || {before!r}) !== {before!r}")
    page.wait_for_selector("#pred-corrupted [data-testid=label-output-value], #pred-corrupted .output-class")
    assert not page.evaluate("document.querySelector('#x-t img')?.src"), "the last run's result was not cleared"
    # Purified, the run shows the attack: the perturbation (amplified) and its size, eps = 0.3 up to 8-bit levels.
    seconds, seen = run_purify(page)
    page.wait_for_selector("#perturbation img")
    page.wait_for_selector("#attack-line:has-text('Perturbation')")
    line = text(page, "#attack-line")
    assert re.search(r"L∞ 0\.30\d, L2 \d+\.\d\d", line) and "PSNR" in line and "SSIM" in line, line
    page.wait_for_selector("#run-zip a, #run-zip .file-preview")
    assert ".zip" in text(page, "#run-zip")
    shot(page, "04_corrupt_pgd")
    choose(page, "corruption", "Adaptive")
    page.wait_for_selector("#threat-line:has-text('the attack sees the purifier')")
    assert "forward/backward passes" in text(page, "#threat-line")
    choose(page, "corruption", "Gaussian")
    page.wait_for_selector("#threat-line:has-text('no attacker')")


def test_purify_streams_steps_and_offers_a_gif(page):
    more_settings(page)
    set_slider(page, "steps", 20)
    seconds, seen = run_purify(page)
    steps = {re.match(r"Step (\d+)/20", s).group(1) for s in seen if s.startswith("Step")}
    assert len(steps) >= 5, seen
    assert re.match(r"Done: 20 ddim step", seen[-1])
    page.wait_for_selector("#gif a, #gif .file-preview")
    assert ".gif" in text(page, "#gif")
    page.wait_for_selector("#run-zip a, #run-zip .file-preview")
    assert ".zip" in text(page, "#run-zip")
    shot(page, "05_purify")


def test_stop_button_cancels_a_long_run(page):
    more_settings(page)
    page.click("#method label:has-text('ddpm')")
    page.check("#t-mode input[value=fixed]")  # (auto would choose a shallow t* for this noisy input)
    set_slider(page, "t-star", 400)
    set_slider(page, "steps", 100)
    page.click("#purify-btn")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Step')")
    page.click("#stop-btn")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Stopped')")  # says so
    time.sleep(3)
    line = text(page, "#progress")
    assert re.match(r"Stopped at step \d+/100", line), line  # where it stopped, and no later step came
    # the app keeps working: a short run afterwards completes
    set_slider(page, "t-star", 100)
    set_slider(page, "steps", 10)
    page.click("#method label:has-text('ddim')")
    seconds, seen = run_purify(page)
    assert seen[-1].startswith("Done")


def stroke(page, box, points) -> None:
    """One stroke of the mouse through ``points`` (fractions of the box's width and height)."""
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=12)
    page.mouse.up()


DRAW = "#draw .label-wrap, #draw button:has-text('Draw your own')"  # the accordion's header


def test_draw_a_digit_and_purify_it(page):
    before = page.evaluate("document.querySelector('#model-view img')?.src || ''")
    page.click(DRAW)
    page.wait_for_selector("#sketch canvas", state="visible")
    # The sketchpad opens with the brush in hand: no "select the draw tool" prompt.
    page.wait_for_function("!document.querySelector('#sketch').innerText.includes('select the draw tool')",
                           timeout=10_000)
    canvas = page.locator("#sketch canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    # A 7, off-centre in the upper left of the paper (the white 280x280 square in the middle of the
    # canvas element): the app crops, scales and centres it like an MNIST digit.
    stroke(page, box, [(0.3, 0.25), (0.55, 0.23), (0.42, 0.62)])
    page.wait_for_function("document.querySelector('#prepare-message').innerText"
                           ".includes('centred and scaled like MNIST digits')")
    assert "from a 280x280" in text(page, "#prepare-message")
    page.wait_for_function("document.querySelector('#true-label input').value.startsWith('unknown')")
    page.wait_for_function(f"(document.querySelector('#model-view img')?.src || {before!r}) !== {before!r}")
    seconds, seen = run_purify(page)
    assert seen[-1].startswith("Done"), seen
    page.wait_for_selector("#pred-purified .output-class, #pred-purified [data-testid=label-output-value]")
    shot(page, "11_draw_your_own")
    # Clearing the pad says so; the drawing stays the input.
    page.click("#sketch button[aria-label='Clear canvas']")
    page.wait_for_selector("text=draw something first")
    assert "centred" in text(page, "#prepare-message")
    page.click(DRAW)  # closed again
    page.wait_for_selector("#sketch canvas", state="hidden")
    # Picking an example makes it the input again.
    page.click("#examples button[aria-label='Thumbnail 4 of 20']")
    page.wait_for_function("document.querySelector('#input-image img')?.src.includes('mnist_3_0')")
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('unchanged')")


def test_cifar10_purifies_or_says_it_is_not_trained(page):
    page.wait_for_selector("#draw", state="visible")
    page.click("#dataset label:has-text('CIFAR-10')")
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('32x32 RGB')")
    page.wait_for_selector("#draw", state="hidden", timeout=10_000)  # drawings are for the gray datasets
    page.wait_for_function("document.querySelector('#t-star input[type=number]').value === '100'")  # CIFAR's t*
    # The Learn tab's schedule (plot and text) follows the slider to CIFAR-10's t*.
    page.click("button[role=tab]:has-text('Learn')")
    page.wait_for_function("(document.querySelector('#schedule-text')?.textContent || '').includes('t* = 100 of')")
    page.click("button[role=tab]:has-text('Purify')")
    page.click("#examples button[aria-label='Thumbnail 4 of 20']")  # a cat
    page.wait_for_function("document.querySelector('#true-label input').value === 'cat'")
    if missing_checkpoints("cifar10", ["classifier", "tt-r2"]):
        page.wait_for_selector("#status-line:has-text('not trained yet')")
        page.click("#purify-btn")
        page.wait_for_selector("text=is not trained yet")
        shot(page, "09_cifar10_not_trained", full_page=False, close_toasts=False)
    else:
        page.wait_for_selector("#status-line:has-text('ready')")
        seconds, seen = run_purify(page)
        assert seen[-1].startswith("Done") and "tt-r2" in seen[-1]
        page.wait_for_selector("#pred-purified .output-class, #pred-purified [data-testid=label-output-value]")
        shot(page, "09_cifar10_purify")
    page.click("#dataset [data-testid='MNIST-radio-label']")
    page.wait_for_selector("#status-line:has-text('ready')")
    page.wait_for_function("document.querySelector('#prepare-message').innerText.includes('28x28 gray')")
    page.wait_for_selector("#draw", state="visible", timeout=10_000)
    time.sleep(1.5)  # the sketchpad, shown again, reports its old drawing: that must not replace the example
    assert "unchanged" in text(page, "#prepare-message")
    assert not page.evaluate("document.querySelector('#true-label input').value").startswith("unknown")


def test_compare_ranks(page):
    page.click("#examples button[aria-label='Thumbnail 7 of 20']")  # the default "6"
    page.wait_for_function("document.querySelector('#true-label input').value === '6'")
    page.click("button[role=tab]:has-text('Compare purifiers')")
    # The committed measurements for the current choice come first, the chosen purifier marked.
    page.wait_for_selector("#evidence-plot img")
    page.wait_for_function("document.querySelector('#evidence-text').innerText.includes('test images')")
    page.click("#compare-btn")
    from tendiff.pipeline import Studio
    expected = Studio().available_purifiers("mnist")
    page.wait_for_selector(f"#compare-status:has-text('{len(expected)} of {len(expected)} purifier(s) done')", timeout=180_000)
    table = text(page, "#compare-table")
    for model in expected:
        assert model in table
    assert page.locator("#compare-gallery img").count() >= 1
    page.wait_for_selector("#compare-csv a, #compare-csv .file-preview")
    assert ".csv" in text(page, "#compare-csv")
    shot(page, "06_compare_ranks")


def purify_salt_and_pepper_with(page, elem_id: str, shown: str, undo: str, screenshot: str,
                                measured: str = "") -> str:
    """Pick ``shown`` in the dropdown ``elem_id``, wait for the measured line to name ``measured``,
    purify salt-and-pepper noise, put both settings back (``undo``; Gaussian noise); returns the
    final summary line."""
    page.click("button[role=tab]:has-text('Purify')")
    choose(page, "corruption", "Salt and pepper")
    choose(page, elem_id, shown)
    page.wait_for_function(f"(document.querySelector('#evidence-line')?.innerText || '').includes({measured!r})")
    try:
        return run_purify(page)[1][-1]
    finally:
        page.wait_for_selector("#pred-purified .output-class, #pred-purified [data-testid=label-output-value]")
        shot(page, screenshot)
        choose(page, elem_id, undo)
        choose(page, "corruption", "Gaussian")


def test_classical_purifier_runs_from_the_list(page):
    summary = purify_salt_and_pepper_with(page, "model", "classical: median3", "tt-r2", "10_classical_median")
    assert "one pass of the classical median3 filter" in summary


def test_a_classical_step_before_the_purifier(page):
    """The hybrid: median3 first, then the diffusion purifier; the summary and the measured line say so."""
    summary = purify_salt_and_pepper_with(page, "prefilter", "median3", "none", "13_hybrid_median3", "median3+tt-r2")
    assert "the classical median3 filter, then" in summary


def test_learn_view(page):
    page.click("button[role=tab]:has-text('Learn')")
    page.click("#learn-btn")
    page.wait_for_selector("text=dense weights; TT cores")
    page.wait_for_selector("#schedule-plot img, #schedule-plot svg, #schedule-plot canvas")
    page.click("#guide-btn")
    page.wait_for_function("document.querySelector('#guide-text').innerText.match(/true label|Not trained yet/)")
    guide = text(page, "#guide-text")
    if "Not trained yet" not in guide:  # the text reports the run: each image's prediction as captioned
        page.wait_for_selector("#guide-gallery img")
        captions = page.locator("#guide-gallery .caption-label").all_inner_texts()
        assert len(captions) == 3, captions
        for caption in captions:  # "true label 6 -> 6 (99%)" and "- true label 6: purified image read as **6**"
            name, read = re.match(r"(.+) -> (.+) \(\d+%\)", caption).groups()
            assert f"{name}: purified image read as {read}" in guide, (caption, guide)
    shot(page, "07_learn")


def test_api_view(page):
    page.click("button[role=tab]:has-text('API')")
    page.wait_for_selector("text=gradio_client")
    shot(page, "08_api", full_page=False)
