"""The browser demo (`vivit-medmnist-demo`), driven in a real headless Chromium by Playwright (issue 19).

The demo runs as a user starts it, in its own process; the test uploads a real AdrenalMNIST3D volume, waits for
the prediction, moves a slice slider and checks that the picture changed, switches the explanation method, and
keeps a screenshot. It needs Debian's `chromium` (`.ci/run` installs it; browsers that download themselves
cannot be fetched here) and the `demo` extra; `VIVIT_MEDMNIST_REQUIRE_BROWSER=1` (set by `.ci/run`) turns a
missing browser into a failure instead of a skip. `DEMO_SCREENSHOT=PATH` also writes the screenshot there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_hub_files import make_folder

from vivit_medmnist.demo import build_demo, render, write_space

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def browser_or_skip():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (the dev extra)"
    if reason is None and not Path(CHROMIUM).is_file():
        reason = f"no Chromium at {CHROMIUM} (Debian's chromium package; .ci/run installs it)"
    if reason:
        if os.environ.get("VIVIT_MEDMNIST_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    pytest.importorskip("gradio")
    model = tmp_path_factory.mktemp("demo_model")
    make_folder(model)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo.py"), str(model), "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"the demo did not start:\n{server.stdout.read()[-3000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_the_demo_in_a_real_browser(demo_url, shared_data_dir, tmp_path):
    sync_playwright = browser_or_skip()
    volume = tmp_path / "adrenal_test_0.npy"
    np.save(volume, np.load(shared_data_dir / "adrenalmnist3d.npz")["test_images"][0])
    screenshot = tmp_path / "demo.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            page.goto(demo_url)
            page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
            page.set_input_files("input[type=file]", str(volume))
            status = page.get_by_text("Evidence for it: occlusion")
            status.wait_for(timeout=180_000)
            assert "normal" in page.locator("body").inner_text()  # the label and its probability are shown
            axial = page.locator("#view-axial img")
            before = axial.get_attribute("src")

            slider = page.locator("#slice-D input[type=number]")
            slider.fill("3")
            slider.press("Enter")
            page.wait_for_function(
                "([el, old]) => el.getAttribute('src') !== old", arg=[axial.element_handle(), before], timeout=60_000
            )
            assert axial.get_attribute("src") != before  # another slice is shown

            page.locator("#method").get_by_text("rollout").click()
            page.get_by_text("by rollout").wait_for(timeout=120_000)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    if target := os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, target)


def test_the_demo_refuses_what_is_not_a_volume(tmp_path):
    gr = pytest.importorskip("gradio")
    model = tmp_path / "model"
    make_folder(model)
    demo = build_demo(str(model))
    analyse = next(fn for fn in demo.fns.values() if fn.name == "analyse").fn
    image = tmp_path / "slice.npy"
    np.save(image, np.zeros((28, 28), dtype=np.uint8))
    with pytest.raises(gr.Error, match=r"slice.npy: expected a volume \(D, H, W\), got an array of shape \(28, 28\)"):
        analyse(str(image), "rollout", 0.5, None)
    hounsfield = tmp_path / "ct.npy"
    np.save(hounsfield, np.full((28, 28, 28), -1000.0))
    with pytest.raises(gr.Error, match="ct.npy: expected float volumes scaled to"):
        analyse(str(hounsfield), "rollout", 0.5, None)
    with pytest.raises(gr.Error, match="upload a .npy"):
        analyse(None, "rollout", 0.5, None)


def test_render_blends_the_evidence_where_it_is():
    volume = np.zeros((28, 28, 28), dtype=np.float32)
    heatmap = np.zeros_like(volume)
    heatmap[5, 6, 7] = 1.0
    axial, _, _ = render(volume, heatmap, (5, 6, 7), opacity=1.0)
    assert axial.shape == (252, 252, 3) and axial.dtype == np.uint8  # 28 * 9 pixels
    assert axial[6 * 9, 7 * 9].sum() > 0 and axial[0, 0].sum() == 0  # coloured where the evidence is
    assert render(volume, heatmap, (5, 6, 7), opacity=0.0)[0].max() == 0  # opacity 0: the volume alone


def test_write_space_makes_a_gradio_space(tmp_path):
    written = write_space("org/vivit-adrenal", tmp_path / "space")
    names = sorted(path.name for path in written)
    assert names == ["README.md", "app.py", "requirements.txt"]
    assert 'build_demo("org/vivit-adrenal").launch()' in (tmp_path / "space" / "app.py").read_text()
    assert "sdk: gradio" in (tmp_path / "space" / "README.md").read_text()
    with pytest.raises(FileExistsError):
        write_space("org/vivit-adrenal", tmp_path / "space")
