"""The page in a real browser: Debian's Chromium, headless, driven by Playwright's Python client (no browser
download at run time). Type a prompt, generate, watch progress and the preview, find the image in the
gallery, load settings back from it (its button, a PNG file, a dropped PNG), and cancel jobs.

A screenshot of the page after a generation is saved under the test's tmp dir (and copied to the path in
DIFFUSEKIT_SERVE_SCREENSHOT when that is set, which is how docs/serve-page.png is made)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serving import running

CHROMIUM = os.environ.get("DIFFUSEKIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed "
                               "(pip install -e '.[serve,browser-test]')")  # fmt: skip
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; .ci/run installs it)",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-browser"), preview_every=0.0) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#model').textContent.includes('stable_diffusion')")
        page.errors = errors  # type: ignore[attr-defined]
        yield page
        browser.close()
    assert not errors, errors  # no script error on the page during the whole module


def test_generate_shows_progress_preview_and_the_image_in_the_gallery(page, server, tmp_path):
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#negative", "fog")
    page.select_option("#sampler", "Euler")
    for field, value in (("#steps", "150"), ("#cfg", "6"), ("#seed", "42"), ("#width", "16"), ("#height", "16")):
        page.fill(field, value)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('running: step')")
    page.wait_for_function("parseFloat(document.querySelector('#progress-bar').style.width) > 0")
    page.wait_for_selector("#preview:not([hidden])")  # the preview of the running job's estimate
    figure = page.wait_for_selector('figure[data-seed="42"]', timeout=60_000)
    page.wait_for_function("document.querySelector('figure[data-seed=\"42\"] img').naturalWidth === 16")
    assert "a lighthouse at dusk" in figure.inner_text()
    page.wait_for_function("document.querySelector('#status').textContent === 'idle'")
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("DIFFUSEKIT_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DIFFUSEKIT_SERVE_SCREENSHOT"])
    jobs = server.request("GET", "/api/jobs").json()["jobs"]
    made = [j for j in jobs if j["settings"]["prompt"] == "a lighthouse at dusk"]
    assert len(made) == 1 and made[0]["state"] == "done" and made[0]["settings"]["sampler_name"] == "Euler"


def _forget_settings(page) -> None:
    page.fill("#prompt", "something else")
    page.fill("#negative", "")
    page.fill("#seed", "-1")
    page.fill("#steps", "3")
    page.select_option("#sampler", "")


def _expect_settings(page) -> None:
    page.wait_for_function("document.querySelector('#prompt').value === 'a lighthouse at dusk'")
    assert page.input_value("#negative") == "fog"
    assert page.input_value("#seed") == "42"
    assert page.input_value("#steps") == "150"
    assert page.input_value("#cfg") == "6"
    assert page.input_value("#sampler") == "Euler"


def test_settings_come_back_from_an_image(page, server, tmp_path):
    _forget_settings(page)
    page.click('figure[data-seed="42"] button.use')
    _expect_settings(page)
    # the same from the PNG file, chosen and dropped
    url = page.get_attribute('figure[data-seed="42"] img', "src")
    png = tmp_path / "made.png"
    png.write_bytes(server.request("GET", url).body)
    _forget_settings(page)
    page.set_input_files("#load-png", str(png))
    _expect_settings(page)
    _forget_settings(page)
    page.evaluate("""async (url) => {
        const blob = await (await fetch(url)).blob();
        const data = new DataTransfer();
        data.items.add(new File([blob], "made.png", {type: "image/png"}));
        window.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", url)  # fmt: skip
    _expect_settings(page)
    page.click('figure[data-seed="42"] button.use')
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "42"


def test_send_to_img2img_and_generate(page, server):
    page.click('figure[data-seed="42"] button.to-img2img')
    page.wait_for_selector("#img2img-panel:not([hidden])")
    page.wait_for_selector("#init-thumb:not([hidden])")
    page.fill("#steps", "4")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector('figure[data-seed="7"]', timeout=60_000)
    jobs = server.request("GET", "/api/jobs").json()["jobs"]
    assert jobs[-1]["mode"] == "img2img" and jobs[-1]["state"] == "done"
    page.click("#tab-txt2img")


def test_queue_several_and_cancel(page, server):
    page.fill("#prompt", "a very long job")
    page.fill("#steps", "900")
    page.fill("#seed", "5")
    page.fill("#repeat", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').textContent === 'queued 2 jobs'")
    page.wait_for_selector("#queue li:has(.state.running)")
    page.wait_for_selector("#queue li:has(.state.queued)")
    page.locator("#queue li:has(.state.running) button.cancel").click()  # a locator: the row redraws each step
    page.wait_for_selector("#queue li:has(.state.cancelled)")
    page.click("#cancel-all")
    page.wait_for_function("document.querySelectorAll('#queue li .state.cancelled').length === 2")
    page.fill("#repeat", "1")
    known = server.request("GET", "/api/jobs").json()["jobs"]
    jobs = [j for j in known if j["settings"]["prompt"] == "a very long job"]
    assert [j["state"] for j in jobs] == ["cancelled", "cancelled"]
    assert jobs[0]["step"] < 900 and jobs[1]["images"] == []
