"""The headless-Chromium driver (tests/browser.py) on small pages written here: it hears errors, stays quiet on a
clean page, clicks like a person, returns JSON values, times out and cleans up.

Skipped without Chromium, unless THALWEG_BROWSER=required (CI), where a missing Chromium fails.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from browser import Browser, BrowserError, BrowserTimeout, JavaScriptError, living_processes, require_chromium


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    with Browser() as b:
        yield b


def _page(tmp_path: Path, body: str, name: str = "page.html") -> str:
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>test</title></head><body>{body}</body></html>")
    return path.as_uri()


def test_console_errors_and_uncaught_exceptions_are_reported(browser: Browser, tmp_path: Path) -> None:
    """console.error and console.assert, an exception thrown while loading and one thrown later (after load, from a
    timer), and the browser's own error for a missing image: each is one string naming what happened."""
    url = _page(tmp_path, """
        <script>console.error("first", 42); console.assert(1 === 2, "second"); console.warn("only a warning");</script>
        <img src="missing.png">
        <script>setTimeout(() => { throw new TypeError("fourth") }, 0); throw new Error("third");</script>""")
    with browser.open(url) as page:
        page.evaluate("new Promise(done => setTimeout(done, 50))")  # lets the timer's exception happen
        errors = page.errors
    assert len(errors) == 5, errors
    assert any(e.startswith("console.error: first 42") for e in errors), errors
    assert any(e.startswith("console.assert: second") for e in errors), errors
    assert any("Uncaught Error: third" in e for e in errors), errors
    assert any("Uncaught TypeError: fourth" in e for e in errors), errors
    assert any("missing.png" in e and "ERR_FILE_NOT_FOUND" in e for e in errors), errors
    assert not any("only a warning" in e for e in errors)


def test_a_clean_page_reports_no_errors(browser: Browser, tmp_path: Path) -> None:
    url = _page(tmp_path, "<p id='p'></p><script>console.log('log'); console.info('info'); console.warn('warn');"
                          "document.getElementById('p').textContent = 'script ran';</script>")
    with browser.open(url) as page:
        assert page.evaluate("document.getElementById('p').textContent") == "script ran"  # not an empty page
        assert page.errors == []


def test_pages_open_together_keep_their_own_errors_and_can_each_be_clicked(browser: Browser, tmp_path: Path) -> None:
    """Each page is visible (in a window of its own), so the one opened first still runs its frames and takes clicks."""
    noisy = browser.open(_page(tmp_path, "<script>console.error('noisy')</script><button onclick='this.remove()'>x</button>",
                               "noisy.html"))
    with browser.open(_page(tmp_path, "<p>quiet</p>", "quiet.html")) as quiet:
        assert noisy.evaluate("document.visibilityState") == quiet.evaluate("document.visibilityState") == "visible"
        noisy.click("button")
        assert noisy.evaluate("document.querySelectorAll('button').length") == 0
        assert quiet.errors == []
    assert [e.split(" (")[0] for e in noisy.errors] == ["console.error: noisy"]
    noisy.close()


def test_click_is_a_real_mouse_click_on_the_element(browser: Browser, tmp_path: Path) -> None:
    """The handler sees a trusted event (not element.click()) at the button's centre; a button far below the fold is
    scrolled to first. Clicking nothing, a hidden element or a covered one is refused by name."""
    url = _page(tmp_path, """
        <button id="near" onclick="this.textContent = 'pressed'">press</button>
        <div style="height: 3000px"></div>
        <button id="far" onclick="document.body.dataset.log = [event.isTrusted, event.detail, event.clientX > 0].join()">
          far</button>
        <button id="hidden" style="display: none">hidden</button>
        <div style="position: relative"><button id="covered" onclick="this.textContent = 'wrong'">covered</button>
          <div style="position: absolute; inset: 0; background: white"></div></div>""")
    with browser.open(url) as page:
        page.click("#near")
        assert page.evaluate("document.getElementById('near').textContent") == "pressed"
        assert page.evaluate("scrollY") == 0
        page.click("#far")
        assert page.evaluate("document.body.dataset.log") == "true,1,true"
        assert page.evaluate("scrollY") > 1000
        with pytest.raises(BrowserError, match="no element matches"):
            page.click("#absent")
        with pytest.raises(BrowserError, match="no size"):
            page.click("#hidden")
        with pytest.raises(BrowserError, match="covered by <div"):
            page.click("#covered")
        assert page.evaluate("document.getElementById('covered').textContent") == "covered"
        assert page.errors == []


def test_evaluate_returns_json_values_and_raises_what_javascript_throws(browser: Browser, tmp_path: Path) -> None:
    with browser.open(_page(tmp_path, "<ul><li>a</li><li>b</li></ul>")) as page:
        assert page.evaluate("6 * 7") == 42
        assert page.evaluate("0.5 / 4") == 0.125
        assert page.evaluate("'a' + 'b'") == "ab"
        assert page.evaluate("[...document.querySelectorAll('li')].map(li => li.textContent)") == ["a", "b"]
        assert page.evaluate("({n: 1, list: [true, null], s: 'x'})") == {"n": 1, "list": [True, None], "s": "x"}
        assert page.evaluate("undefined") is None
        assert page.evaluate("-Infinity") == float("-inf")
        assert page.evaluate("new Promise(done => setTimeout(() => done([1, 2]), 10))") == [1, 2]
        with pytest.raises(JavaScriptError, match="boom"):
            page.evaluate("(() => { throw new RangeError('boom') })()")
        with pytest.raises(JavaScriptError, match="rejected"):
            page.evaluate("Promise.reject(new Error('rejected'))")
        assert page.errors == []  # what evaluate raises is not an uncaught exception of the page


def test_every_wait_times_out_with_what_it_waited_for(browser: Browser, tmp_path: Path) -> None:
    with browser.open(_page(tmp_path, "<p>x</p>")) as page:
        with pytest.raises(BrowserTimeout, match=r"timed out after 0.3 s waiting for Runtime.evaluate of 'new Promise"):
            page.evaluate("new Promise(() => {})", timeout=0.3)
        assert page.evaluate("1 + 1") == 2  # still usable: the late answer does not get in the way
        with pytest.raises(BrowserTimeout, match="waiting for nothing in particular"):
            browser.wait_for(lambda: False, timeout=0.2, what="nothing in particular")
    with pytest.raises(BrowserError, match="cannot load .*ERR_FILE_NOT_FOUND"):
        browser.open((tmp_path / "absent.html").as_uri())


def test_the_browser_is_killed_and_its_profile_removed(tmp_path: Path) -> None:
    """On a normal exit and on an exception inside the block: no process of Chromium's group is left, nor its
    profile directory."""
    require_chromium()
    for failing in (False, True):
        with pytest.raises(ZeroDivisionError) if failing else contextlib.nullcontext():
            with Browser() as b:
                group, profile = b.process.pid, b.profile
                assert Path(profile).is_dir() and b.open(_page(tmp_path, "<p>x</p>")).evaluate("2 + 2") == 4
                assert len(living_processes(group)) > 1  # Chromium and its helpers: the check below can fail
                if failing:
                    1 / 0
        assert living_processes(group) == []
        assert not Path(profile).exists()
