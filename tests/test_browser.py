"""The first hour in JupyterLab, in a real browser: JupyterLab started as ``make lab`` prepares it
(the course's settings, trusted notebooks), driven by headless Chromium through selenium.

A student opens ``00_setup`` and runs it (Run menu, "Run All Cells") and reads "All set."; runs
notebook 01 and moves its slider, and the figure is redrawn for the new value; opens notebook 06
without running it and sees the guidance slider's picture, trusted or not. No news pop-up, no
kernel dialog. The notebooks are copies in a temporary folder (JupyterLab autosaves what it opens).

Needs Chromium and ChromeDriver (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run``
installs them); skips, saying so, where they are missing."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from course.lab import install_lab_settings, trust_notebooks
from course.widgets import png_title

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("COURSE_REQUIRE_BROWSER") == "1"  # .ci/run sets it: there a skip is a failure
try:
    from selenium import webdriver
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("selenium is not installed (pip install -e '.[dev]')", allow_module_level=True)
if CHROMIUM is None or DRIVER is None:
    missing = ("the browser test needs Chromium and ChromeDriver (Debian: apt-get install chromium "
               "chromium-driver); .ci/run installs them")
    if REQUIRED:
        raise RuntimeError(missing + ", and COURSE_REQUIRE_BROWSER=1 asks for the test to run")
    pytest.skip(missing, allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

NOTEBOOKS = ["00_setup.ipynb", "01_forward_sdes.ipynb", "06_guidance.ipynb"]
UNTRUSTED = "06_guidance_untrusted.ipynb"  # a byte copy of 06 that is never signed
TOKEN = "course-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free local port with a token, prepared as ``make lab`` does,
    in folders of its own (data, config, user settings, workspaces)."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, root / name)
    untrusted = json.loads((ROOT / "notebooks" / "06_guidance.ipynb").read_text())
    untrusted["metadata"]["course_browser_test"] = "never signed"  # trust goes by content: make it differ
    (root / UNTRUSTED).write_text(json.dumps(untrusted, indent=1, ensure_ascii=False) + "\n")
    data_dir = tmp / "data"
    # what `course lab` does, with the course's settings in a prefix of the test's own
    settings = install_lab_settings(prefix=tmp / "prefix").parent.parent
    trust_notebooks([root / name for name in NOTEBOOKS], data_dir=data_dir)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel draws inline
    env.update(JUPYTER_DATA_DIR=str(data_dir), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(tmp / "user-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), PYTHONPATH=str(ROOT))
    port = _free_port()
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
               f"--LabApp.app_settings_dir={settings}"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        command.append("--allow-root")
    log = open(tmp / "jupyterlab.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                log.close()
                pytest.fail("JupyterLab did not start:\n" + (tmp / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.3)
    yield url, root
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _open(driver, lab, name):
    url, _ = lab
    driver.get(f"{url}/lab/tree/{name}?reset&token={TOKEN}")  # reset: only this notebook open
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    # the kernel starts without asking (no "Select Kernel" dialog) and becomes idle
    WebDriverWait(driver, 60).until(lambda d: _kernel_idle(d) or _dialog(d))
    assert not _dialog(driver), f"a dialog opened with {name}: {_dialog(driver)}"
    assert not _news(driver), f"a news/update notification covers {name}: {_news(driver)}"


def _kernel_idle(driver) -> bool:
    """The notebook has loaded (no spinner) and the status bar says its kernel is idle."""
    return bool(driver.execute_script(
        "if (document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Spinner')) return false;"
        "return Array.from(document.querySelectorAll('.jp-StatusBar-TextItem'))"
        ".some(e => /\\|\\s*Idle/.test(e.textContent));"))


def _dialog(driver) -> str:
    return " ".join(d.text for d in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"))


def _news(driver) -> str:
    return " ".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, ".Toastify__toast")
                    if "news" in t.text.lower() or "update" in t.text.lower())


def _run_all(driver):
    """Run menu, then "Run All Cells", as a student does."""
    menu = next(m for m in driver.find_elements(By.CSS_SELECTOR, "#jp-MainMenu .lm-MenuBar-item")
                if m.text.strip() == "Run")
    menu.click()
    item = WebDriverWait(driver, 10).until(lambda d: next(
        (i for i in d.find_elements(By.CSS_SELECTOR, ".lm-Menu .lm-Menu-item")
         if i.text.strip().startswith("Run All Cells")), None))
    item.click()


def _active(driver):
    return driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")


def _code_cell(driver, needle: str):
    """The code cell of the visible notebook whose source contains ``needle``, scrolled into view.
    JupyterLab attaches cells and their editors only near the viewport, so the notebook is
    scrolled down a screen at a time until the cell is found."""
    read = "const e = arguments[0].querySelector('.jp-InputArea .cm-content'); return e ? e.textContent : '';"
    scroller = _active(driver).find_element(By.CSS_SELECTOR, ".jp-WindowedPanel-outer")
    driver.execute_script("arguments[0].scrollTop = 0;", scroller)
    for _ in range(400):
        for cell in _active(driver).find_elements(By.CSS_SELECTOR, ".jp-CodeCell"):
            if needle in (driver.execute_script(read, cell) or ""):
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
                time.sleep(0.5)
                return cell
        at_end = driver.execute_script(
            "const s = arguments[0]; const end = s.scrollTop + s.clientHeight >= s.scrollHeight - 2;"
            "s.scrollTop += 0.7 * s.clientHeight; return end;", scroller)
        if at_end:
            break
        time.sleep(0.2)
    raise AssertionError(f"no code cell containing {needle!r}")


def _executed(driver, cell) -> bool:
    """The cell shows an execution count: it ran (with Run All, so did every cell above it)."""
    prompt = driver.execute_script(
        "const p = arguments[0].querySelector('.jp-InputArea-prompt'); return p ? p.textContent.trim() : '';", cell)
    return re.fullmatch(r"\[\d+\]:?", prompt) is not None


def _errors(driver) -> str:
    return "\n".join(e.text for e in _active(driver).find_elements(
        By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        if "Error" in e.text or "Traceback" in e.text)


def _image_titles(element) -> list[str]:
    """The Title chunks of the PNG images shown inside ``element`` (course.widgets.figure_png)."""
    titles = []
    for img in element.find_elements(By.TAG_NAME, "img"):
        src = img.get_attribute("src") or ""
        if src.startswith("data:image/png;base64,"):
            titles.append(png_title(base64.b64decode(src.split(",", 1)[1])))
    return titles


def _wait(driver, timeout, condition, message):
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: condition())
    except WebDriverException as exc:
        raise AssertionError(f"{message} (after {timeout} s); errors shown: {_errors(driver) or 'none'}") from exc


def test_setup_notebook_runs_and_says_all_set(lab, browser):
    _open(browser, lab, "00_setup.ipynb")
    _run_all(browser)
    cell = _code_cell(browser, "environment_report()")
    _wait(browser, 120, lambda: "All set." in cell.text, "00_setup did not print 'All set.'")
    assert "\u2717" not in cell.text, cell.text


def test_notebook_01_runs_and_its_slider_redraws_the_figure(lab, browser):
    _open(browser, lab, "01_forward_sdes.ipynb")
    _run_all(browser)
    cell = _code_cell(browser, "interactive_figure(draw")  # its last code cell
    _wait(browser, 300, lambda: _executed(browser, cell) or _errors(browser), "notebook 01 did not finish")
    assert not _errors(browser), _errors(browser)
    widget = _wait(browser, 30, lambda: cell.find_elements(By.CSS_SELECTOR, ".widget-interact"),
                   "notebook 01's slider did not appear")[0]
    _wait(browser, 30, lambda: _image_titles(widget) == ["VP, t = 0.20"], "the slider's first figure is not VP at t = 0.20")
    track = widget.find_element(By.CSS_SELECTOR, ".widget-hslider .slider")
    assert track.size["width"] >= 400, f"slider track {track.size['width']} px for 101 values"
    handle = widget.find_element(By.CSS_SELECTOR, ".widget-hslider .noUi-handle")
    handle.click()
    for _ in range(10):
        handle.send_keys(Keys.ARROW_RIGHT)
    readout = widget.find_element(By.CSS_SELECTOR, ".widget-hslider .widget-readout")
    _wait(browser, 30, lambda: readout.text.strip() == "0.30", f"the readout shows {readout.text!r}, not 0.30")
    _wait(browser, 60, lambda: _image_titles(widget) == ["VP, t = 0.30"],
          "the figure was not redrawn for t = 0.30")


@pytest.mark.parametrize("name", ["06_guidance.ipynb", UNTRUSTED])
def test_notebook_06_shows_the_slider_picture_before_running(lab, browser, name):
    _open(browser, lab, name)
    cell = _code_cell(browser, "guidance_slider(unet")
    expected = "classifier-free guidance, w = 0 (10 Euler steps)"
    _wait(browser, 30, lambda: _image_titles(cell) == [expected], f"{name}: the slider's picture is not shown")
    images = cell.find_elements(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].naturalWidth", images[0]) > 100
    assert "interactive(children=" not in cell.text

