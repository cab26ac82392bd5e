"""The page really renders and streams: Playwright drives Debian's headless Chromium.

Chromium comes from Debian's `chromium` package (installed here with apt-get when missing;
Playwright never downloads a browser). The test opens the app on the embedded models, clicks
Generate, waits for both panes and both heatmaps, walks the token inspector and the Why dReLU
tab, downloads the run, reopens its link, and stops a long run. It takes a screenshot of each
view; only `pytest tests/test_browser.py --update-screenshot` writes them over the ones README
shows (assets/screenshot*.png).
"""

import shutil
import subprocess

import pytest

from conftest import REPO, SHIPPED
from turbo_demo.commands.loadtest import default_compares, free_port, running_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def ensure_chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`python app.py` itself, as a visitor meets it (its thread policy, its warm-up before it
    serves, its kernels), on 127.0.0.1; stopped when the module's tests end."""
    if not (SHIPPED / "turbosparse-drelu" / "config.json").is_file():
        pytest.fail("the embedded models are missing from assets/models")
    with running_app(free_port(), tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=ensure_chromium(), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(app_url)
        yield page
        browser.close()


def output_text(page, side):
    return page.locator(f"#{side}-text textarea").input_value()


def test_generate_streams_both_panes_and_draws_heatmaps(page, request, tmp_path):
    page.click("#generate")
    for side in ("left", "right"):
        page.wait_for_function(f"document.querySelector('#{side}-text textarea').value.length > 0", timeout=120_000)
    for plot in ("heat-left", "heat-right"):
        page.wait_for_selector(f"#{plot} .js-plotly-plot .heatmaplayer", timeout=60_000)
    page.wait_for_function("document.body.innerText.includes('Done.')", polling=100, timeout=120_000)
    assert "tok/s" in page.inner_text("#headline")
    assert output_text(page, "left") and output_text(page, "right")
    update = request.config.getoption("--update-screenshot")
    shot = REPO / "assets" / "screenshot.png" if update else tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000


def screenshot(page, request, tmp_path, name: str) -> None:
    """The page as it is now, into assets/NAME.png with --update-screenshot (README shows it)."""
    update = request.config.getoption("--update-screenshot")
    shot = (REPO / "assets" if update else tmp_path) / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_the_inspector_shows_both_panes_maps_for_a_selected_token(page, request, tmp_path):
    """After the run above: the tokens are shaded by sparsity, and clicking one draws every
    layer's neuron map of both panes at that position."""
    page.get_by_role("tab", name="Inspect tokens").click()
    tokens = page.locator("#right-tokens .score-token")
    tokens.nth(2).wait_for(timeout=30_000)
    assert page.locator("#left-tokens .score-token").count() > 2
    tokens.nth(2).click()
    page.wait_for_function(
        "document.querySelector('#neuron-maps .gtitle')?.textContent.startsWith('Token 3')", polling=100, timeout=30_000
    )
    assert page.locator("#inspect-step input[type=number]").input_value() == "3"
    assert page.locator("#neuron-maps .nsewdrag").count() == 2 * 4  # both panes x 4 layers
    screenshot(page, request, tmp_path, "screenshot-inspect")


def test_why_drelu_draws_the_sweep_and_the_last_runs_plane(page, request, tmp_path):
    page.get_by_role("tab", name="Why dReLU").click()
    page.wait_for_selector("#sweep .js-plotly-plot", timeout=30_000)
    page.click("#plane-draw")
    page.wait_for_function("document.body.innerText.includes('Measured:')", polling=100, timeout=60_000)
    page.click("#sweep-text")
    page.wait_for_function("document.body.innerText.includes('Scored')", polling=100, timeout=120_000)
    assert page.locator("#plane .heatmaplayer").count() >= 1
    screenshot(page, request, tmp_path, "screenshot-why")
    page.get_by_role("tab", name="Compare").click()


def test_a_run_downloads_and_its_link_reopens_the_same_settings(page, app_url, request, tmp_path):
    """After the run above: the zip downloads, and the share link restores prompt, models, modes."""
    page.wait_for_selector("#download", state="visible", timeout=60_000)
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "run.zip"
    info.value.save_as(saved)
    import zipfile

    assert {"records.json", "steps.csv"} <= set(zipfile.ZipFile(saved).namelist())
    link = page.locator("#share a").get_attribute("href")
    assert link.startswith("?prompt=")
    prompt = page.locator("textarea").first.input_value()
    page.goto(app_url + "?" + link[1:].replace("right_mode=predictor", "right_mode=exact"))
    page.wait_for_function(
        "document.querySelector('#right-mode input')?.value.startsWith('exact')", polling=100, timeout=30_000
    )
    assert page.locator("#left-model input").input_value() == "Dense SwiGLU"
    assert page.locator("textarea").first.input_value() == prompt
    screenshot(page, request, tmp_path, "screenshot-link")
    page.goto(app_url)


def test_the_talk_layout_opens_from_its_link_and_streams(page, app_url, request, tmp_path):
    page.goto(app_url + "?view=talk")
    page.wait_for_selector("#talk-generate", state="visible", timeout=30_000)
    assert not page.locator("#generate").is_visible()  # the Compare tab's settings are hidden
    page.click("#talk-generate")
    page.wait_for_function(
        "document.querySelector('#talk-right-numbers')?.innerText.includes('tok/s')", polling=100, timeout=120_000
    )
    page.wait_for_selector("#talk-maps .js-plotly-plot .heatmaplayer", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('.pending').length === 0", polling=200, timeout=120_000)
    assert page.inner_text("#talk-left-text") and "idle" in page.inner_text("#talk-right-numbers")
    screenshot(page, request, tmp_path, "screenshot-talk")
    page.goto(app_url)


def test_a_side_quantized_at_load_runs_from_the_weights_menu(page):
    page.locator("#right-quant input").click()
    page.get_by_role("option", name="int8: blocks of 32, a scale each").click()
    page.click("#generate")
    page.wait_for_function(
        "document.querySelector('#right-status')?.innerText.includes('int8 weights')", polling=100, timeout=180_000
    )
    page.wait_for_function("document.body.innerText.includes('Done.')", polling=100, timeout=120_000)
    assert output_text(page, "right")
    page.reload()


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """A random model big enough (~70M parameters) that 256 tokens take seconds, not a blink."""
    from conftest import tiny_model, tiny_tokenizer
    from turbo_demo.checkpoints.checkpoint import save_checkpoint

    model = tiny_model(
        "dense",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return save_checkpoint(model, tiny_tokenizer(), tmp_path_factory.mktemp("slow") / "model")


def test_stop_ends_a_long_run(page, slow_model_dir):
    for side in ("left", "right"):
        box = page.locator(f"#{side}-model input")
        box.fill(str(slow_model_dir))
        box.press("Enter")
    page.get_by_text("Generation settings").click()
    box = page.locator("input[aria-label='number input for Max new tokens']")
    box.fill("256")
    box.press("Enter")
    page.click("#generate")
    # polled every 100 ms rather than per animation frame, which a busy headless Chromium may
    # defer for as long as the waits last (seen on this project's machines for both)
    page.wait_for_function("document.body.innerText.includes('Generating')", polling=100, timeout=120_000)
    page.click("#stop", force=True)  # no waiting for the live plots to settle: stop mid-run
    page.wait_for_function("document.body.innerText.includes('Stopped.')", polling=100, timeout=60_000)
    status = page.inner_text("#right-status")
    assert "stopped" in status and str(slow_model_dir) in status


def test_the_api_serves_the_default_compare_warm(app_url):
    """The compare endpoint with the prompt only, as README shows it and `bench --served` calls
    it: a speed-up, and no load or warm-up paid (app.py warmed the default pair before serving)."""
    (summary,) = default_compares(app_url, 1)
    assert summary["speedup"] > 0 and not summary["left"]["error"] and not summary["right"]["error"]
    for side in ("left", "right"):
        assert summary[side]["load_s"] == 0 and summary[side]["warm_up_s"] == 0
        assert 0 < summary[side]["prefill_s"] < summary[side]["first_token_s"]
