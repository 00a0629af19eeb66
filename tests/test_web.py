"""The web extension against a real ComfyUI server (``main.py --cpu`` on 127.0.0.1): the alignment route with good
and bad requests (lone surrogates and deeply nested JSON among them: 4xx with ``{"error"}`` and no traceback in the
server's log) and with random bodies (the strategies of test_web_api_properties), the extension's files being
served, and a browser test (Debian's Chromium driven by Playwright) with ComfyUI's official frontend: the P2P
alignment view, the per-step chart after a tiny-model run, and a screenshot kept under ``test-artifacts/``."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

import di_testing as T
from test_web_api_properties import bodies, check_answer

ARTIFACTS = T.ROOT / "test-artifacts"
CHROMIUM_SKIP = ("Chromium or Playwright not found: the browser test needs `apt-get install chromium` and "
                 "`pip install playwright` (or set CHROMIUM_PATH)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def post(base: str, body, raw: bool = False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(base + "/direct_inversion/p2p_alignment", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    """ComfyUI's server with this pack and the tiny test nodes installed in a base directory of its own."""
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "custom_nodes"
    custom.mkdir()
    (custom / "ComfyUI-DirectInversion").symlink_to(T.ROOT, target_is_directory=True)
    (custom / "di_test_nodes").mkdir()
    (custom / "di_test_nodes" / "__init__.py").write_text(
        f"import sys\nsys.path.insert(0, {str(T.ROOT / 'tests')!r})\n"
        "from comfy_testing import TEST_NODES as NODE_CLASS_MAPPINGS  # noqa: E402\n")
    (base / "input").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(base / "input" / "di_test.png")
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                "--base-directory", str(base), "--disable-auto-launch"],
                               cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if _get(url + "/system_stats")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("ComfyUI's server did not start:\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_route_aligns_prompts(server):
    url, _ = server
    status, body = post(url, {"source": "a cat sitting on a bench", "target": "a dog sitting on a bench",
                              "tokenizer": "sd1"})
    assert status == 200 and body["auto_mode"] == "replace"
    assert [w["word"] for w in body["target"]] == "a dog sitting on a bench".split()
    assert body["target"][1]["positions"] == [2]
    ops = {(e["source"], e["target"]): e["op"] for e in body["alignment"]}
    assert ops[(1, 1)] == "replace" and ops[(0, 0)] == "same"
    status, body = post(url, {"source": "a cat sitting", "target": "a fluffy cat sitting on grass",
                              "tokenizer": "sdxl"})
    assert status == 200 and body["auto_mode"] == "refine"
    assert [e["op"] for e in body["alignment"]] == ["same", "insert", "same", "same", "insert", "insert"]
    status, body = post(url, {"source": "a cat sitting on a bench", "target": "a cat on a bench", "tokenizer": "sd2"})
    assert status == 200 and {"op": "delete", "source": 2, "target": None} in body["alignment"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({"source": "a", "target": 3}, 400, "'target' must be a string"),
    ({"source": "a", "target": "b", "tokenizer": "t5"}, 400, "Unknown tokenizer 't5'"),
    ({"source": "cat " * 600, "target": "b"}, 413, "at most 2000"),
    ({"source": "cat " * 100, "target": "b"}, 422, "does not fit the text encoder's window"),
])
def test_route_rejects_bad_requests(server, body, status, message):
    url, _ = server
    got, answer = post(url, body, raw=isinstance(body, bytes))
    assert got == status and message in answer["error"]


def test_route_rejects_an_oversized_body(server):
    url, _ = server
    got, answer = post(url, b"x" * (64 * 1024), raw=True)
    assert got == 413 and "larger than" in answer["error"]


GOOD = {"source": "a cat sitting on a bench", "target": "a dog sitting on a bench", "tokenizer": "sd1"}
DEEP = "nests arrays and objects more than 32 deep"


@pytest.fixture(scope="module")
def good_answer(server):
    status, answer = post(server[0], GOOD)
    assert status == 200
    return answer


@pytest.mark.parametrize("body, status, message", [
    pytest.param({"source": "a \ud800 cat", "target": "a dog"}, 400,
                 "The source prompt is not valid text: character 2 is a lone surrogate (U+D800)",
                 id="surrogate-source"),
    pytest.param({"source": "a cat", "target": "a dog \udc00"}, 400,
                 "The target prompt is not valid text: character 6 is a lone surrogate (U+DC00)",
                 id="surrogate-target"),
    pytest.param(b'{"source": "a \xed\xa0\x80 cat", "target": "a dog"}', 400, "The source prompt is not valid text",
                 id="surrogate-utf8"),
    pytest.param(b"[" * 5000 + b"]" * 5000, 400, DEEP, id="nested-arrays"),
    pytest.param(b'{"a":' * 2500 + b"0" + b"}" * 2500, 400, DEEP, id="nested-objects"),
    pytest.param(b'{"source": "a", "target": "b", "x": ' + b"[" * 4000 + b"]" * 4000 + b"}", 400, DEEP,
                 id="nested-field"),
])
def test_route_rejects_bad_input_without_a_traceback(server, good_answer, body, status, message):
    url, base = server
    log = base / "server.log"
    start = log.stat().st_size
    got, answer = post(url, body, raw=isinstance(body, bytes))
    assert got == status and message in answer["error"], (got, answer)
    assert post(url, GOOD) == (200, good_answer)
    written = log.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in written and "Error handling request" not in written, written[-3000:]


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=bodies)
def test_route_answers_random_bodies_as_documented(server, raw):
    got, answer = post(server[0], raw, raw=True)
    check_answer(raw, got, answer)


def test_extension_files_are_served(server):
    url, _ = server
    status, listing = _get(url + "/extensions")
    scripts = json.loads(listing)
    ours = [s for s in scripts if s.endswith("direct_inversion.js")]
    assert ours, scripts
    status, script = _get(url + ours[0])
    assert status == 200 and b"DirectInversion.web" in script


def _chromium() -> str | None:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return path


def _browser_workflow() -> dict:
    """p2p_word_swap with the tiny stand-in checkpoint, the test image at 128x128 and 4 steps."""
    workflow = json.loads((T.ROOT / "workflows" / "p2p_word_swap.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "DITest_TinyCheckpoint", []
        elif node["type"] == "LoadImage":
            node["widgets_values"][0] = "di_test.png"
        elif node["type"] == "ImageScale":
            node["widgets_values"][1:3] = [128, 128]
        elif node["type"] == "DirectInversion_Invert":
            node["widgets_values"][1] = 4
    return workflow


@contextlib.contextmanager
def frontend_page(url: str, width: int, height: int):
    """ComfyUI's frontend (served at ``url``) in headless Chromium with the app loaded and no dialog open: yields the
    page and the list its uncaught page errors go to."""
    chromium = _chromium()
    if chromium is None:
        T.skip_or_fail(CHROMIUM_SKIP)
    from playwright.sync_api import sync_playwright

    # a first start opens the templates dialog over the canvas; a user who has seen it has this setting
    request = urllib.request.Request(url + "/api/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(request, timeout=30).close()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                                   timeout=120_000)
            page.keyboard.press("Escape")  # any dialog still open
            yield page, errors
        finally:
            browser.close()


def test_browser_alignment_view_and_chart(server):
    url, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    with frontend_page(url, 1600, 1000) as (page, errors):
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", _browser_workflow())
        page.wait_for_selector(".di-alignment .di-word", timeout=60_000)
        # type a new target prompt into the P2P Editor's textarea, as a user does
        page.evaluate("""() => {
            const node = window.app.graph._nodes.find(n => n.type === 'DirectInversion_P2PEditor');
            const w = node.widgets.find(w => w.name === 'target_prompt');
            w.inputEl.focus();
            w.inputEl.value = '';
            w.inputEl.dispatchEvent(new Event('input', { bubbles: true }));
        }""")
        textarea = page.evaluate_handle("""() => window.app.graph._nodes
            .find(n => n.type === 'DirectInversion_P2PEditor').widgets
            .find(w => w.name === 'target_prompt').inputEl""")
        textarea.as_element().type("a tiger sitting on a bench")
        replaced = page.wait_for_selector(
            '.di-alignment .di-row[data-side=target] .di-word.di-replace:text-is("tiger")', timeout=60_000)
        replaced_words = page.eval_on_selector_all(".di-alignment .di-row[data-side=target] .di-word.di-replace",
                                                   "chips => chips.map(c => c.textContent)")
        assert replaced_words == ["tiger"]
        assert "auto → replace" in page.inner_text(".di-alignment .di-mode")
        # clicking the word makes it a local-blend word
        replaced.click()
        blend = page.evaluate("""() => window.app.graph._nodes
            .find(n => n.type === 'DirectInversion_P2PEditor').widgets
            .find(w => w.name === 'blend_target_words').value""")
        assert blend == "tiger"
        page.click('.di-alignment .di-row[data-side=source] .di-word:text-is("cat")')
        page.evaluate("() => window.app.queuePrompt(0, 1)")
        # Invert's chart (step size) and the sampler's (source error; no offsets: P2P pins the source)
        page.wait_for_function("() => document.querySelectorAll('.di-chart svg polyline').length >= 2",
                               timeout=300_000)
        charts = page.evaluate("() => [...document.querySelectorAll('.di-chart')].map(c => c.innerText)")
        assert any("Direct Inversion" in c for c in charts) and any("inversion" in c for c in charts)
        page.screenshot(path=str(ARTIFACTS / "web_extension.png"))
    assert not [e for e in errors if "direct_inversion" in e.lower()], errors
