"""Headless Chromium for the tests, driven over the Chrome DevTools Protocol (CDP), standard library only.

    with Browser() as browser:
        page = browser.open(path.as_uri())      # returns once the page's load event has fired
        page.evaluate("document.title")         # the JSON value of an expression (promises awaited)
        page.click("table.sortable th")         # a real mouse click at the element's centre
        assert page.errors == []                # console errors and uncaught exceptions, as strings

The protocol travels over ``--remote-debugging-pipe`` rather than a websocket: no port to pick or race for, no
HTTP handshake to write, and nothing another process on the machine could connect to. Chromium reads the
NUL-terminated JSON messages on its fd 3 and writes its own on fd 4.

Every wait has a timeout and names what it was waiting for; Chromium's process group is killed and its
temporary profile removed on exit, also when a test fails or the Browser is dropped without being closed.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 30.0
# Chromium's first message after a cold start can take a while on a loaded 2-core CI machine.
START_TIMEOUT = 60.0
NOT_FOUND = ("no Chromium found (looked for $THALWEG_CHROMIUM, /usr/bin/chromium, and chromium, chromium-browser or "
             "google-chrome on PATH); install it with `apt-get install chromium`")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu",
    # The machines that run the tests reach nothing but package registries: every feature that would phone home
    # is off, so that nothing waits on the network or fills the log with its failures.
    "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--mute-audio",
    # Containers often give /dev/shm a few MB, where Chromium's shared memory would run out and the renderer crash.
    "--disable-dev-shm-usage",
    # A laptop-sized viewport, so that a report laid out for people is laid out here as it would be for them.
    "--window-size=1280,1000",
    "--remote-debugging-pipe",
]

# subprocess cannot place inherited descriptors at chosen numbers, and Chromium insists on 3 and 4; preexec_fn
# could dup2 them but is unsafe in a process with threads (pytest-xdist, pytest-timeout). A tiny interpreter run
# in between moves them into place and becomes Chromium.
_TRAMPOLINE = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
               "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


class BrowserError(RuntimeError):
    """Chromium failed, refused a command, or went away."""


class BrowserTimeout(BrowserError):
    """A wait ran out of time."""


class JavaScriptError(BrowserError):
    """An evaluated expression threw (or its promise rejected)."""


def chromium_path() -> str | None:
    """The Chromium to run: $THALWEG_CHROMIUM (a path or a name on PATH) when set, else Debian's, else the first of
    chromium, chromium-browser, google-chrome on PATH; None when there is none."""
    chosen = os.environ.get("THALWEG_CHROMIUM")
    if chosen:
        # An explicit choice that does not exist is not silently replaced by another browser.
        return shutil.which(chosen)
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> None:
    """For the tests: skip without Chromium, or fail where the run demands the browser tests (THALWEG_BROWSER=required,
    as CI sets it), so that a CI machine without Chromium cannot pass them by skipping them."""
    import pytest  # only the tests call this; the driver itself needs nothing beyond the standard library

    if chromium_path() is not None:
        return
    if os.environ.get("THALWEG_BROWSER") == "required":
        pytest.fail(f"THALWEG_BROWSER=required, but {NOT_FOUND}", pytrace=False)
    pytest.skip(f"{NOT_FOUND} to run the browser tests (THALWEG_BROWSER=required makes its absence a failure)")


def _remote_text(obj: dict[str, Any]) -> str:
    """A console argument or exception (a CDP RemoteObject) as the DevTools console would print it."""
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    if "unserializableValue" in obj:
        return obj["unserializableValue"]
    return obj.get("description") or obj.get("type", "?")


def _where(url: str | None, line: int | None) -> str:
    return f" ({url}:{line + 1})" if url and line is not None else f" ({url})" if url else ""


def _exception_text(details: dict[str, Any]) -> str:
    thrown = details.get("exception")
    what = _remote_text(thrown) if thrown else ""
    return f"{details.get('text', 'exception')} {what}".strip() + _where(details.get("url"), details.get("lineNumber"))


def _python_value(result: dict[str, Any]) -> Any:
    """The JSON value of a CDP RemoteObject returned by value; the numbers JSON cannot carry as floats or ints."""
    if "unserializableValue" in result:
        text = result["unserializableValue"]
        special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "-0": -0.0}
        return special[text] if text in special else int(text.rstrip("n"))  # BigInt: "123n"
    return result.get("value")


def living_processes(group: int) -> list[int]:
    """The processes of process group ``group`` that are not yet dead (zombies waiting to be reaped are dead);
    read from /proc, so empty where there is none."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)", which may hold spaces
        except (OSError, IndexError):
            continue  # it exited while being looked at
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def _kill(proc: subprocess.Popen, profile: str, fds: list[int]) -> None:
    # The whole group: Chromium's renderer and utility processes are its children and would outlive it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # Until the last of them is gone: a dying renderer could still write into the profile being removed.
    deadline = time.monotonic() + 10
    while living_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    shutil.rmtree(profile, ignore_errors=True)


class Browser:
    """One headless Chromium; use it as a context manager. Pages are opened with :meth:`open`."""

    def __init__(self, path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path or chromium_path()
        if self.path is None:
            raise BrowserError(NOT_FOUND)
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.profile: str | None = None
        self._next_id = 0
        self._buffer = b""
        self._responses: dict[int, dict[str, Any]] = {}
        self._abandoned: set[int] = set()
        self._pages: dict[str, Page] = {}

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        # A fresh profile every time: no state from another run (cookies, crash-restore prompts) leaks in.
        self.profile = tempfile.mkdtemp(prefix="thalweg-chromium-")
        # Chromium's output goes to a file: a pipe nobody drains would block it once full.
        self._log = tempfile.TemporaryFile()
        to_chromium, ours_w = os.pipe()
        ours_r, from_chromium = os.pipe()
        # Chromium's ends moved to 5 or above, so that the trampoline's dup2 onto 3 cannot overwrite the one it
        # is about to move onto 4.
        child = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_chromium, from_chromium)]
        for fd in (to_chromium, from_chromium):
            os.close(fd)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, *map(str, child), self.path, *FLAGS,
                 f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, pass_fds=child, start_new_session=True)
        except BaseException:
            for fd in (*child, ours_w, ours_r):
                os.close(fd)
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        for fd in child:  # only Chromium holds them now, so its exit shows here as the end of the pipe
            os.close(fd)
        self._write_fd, self._read_fd = ours_w, ours_r
        os.set_blocking(self._write_fd, False)
        self._finalizer = weakref.finalize(self, _kill, self.process, self.profile, [ours_w, ours_r])
        try:
            self.version = self.call("Browser.getVersion", timeout=START_TIMEOUT, what="Chromium to start")["product"]
        except BaseException:
            self.close()  # __exit__ is not called when __enter__ fails
            raise

    def close(self) -> None:
        """Kill Chromium and its helpers, and remove its profile."""
        # No polite Browser.close first: the profile is thrown away, so there is nothing for Chromium to save,
        # and its orderly shutdown costs half a second a browser.
        if self.process is None:
            return
        self._finalizer()
        self._log.close()
        self.process = None

    # ------------------------------------------------------------ the protocol

    def log_tail(self, size: int = 2000) -> str:
        """The end of Chromium's own output, for error messages."""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - size))
        return self._log.read().decode("utf-8", "replace")

    def _write(self, data: bytes, deadline: float, what: str) -> None:
        view = memoryview(data)
        while view:
            if not select.select([], [self._write_fd], [], max(0.0, deadline - time.monotonic()))[1]:
                raise BrowserTimeout(f"timed out writing to Chromium while waiting for {what}")
            try:
                view = view[os.write(self._write_fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise BrowserError(f"Chromium has exited (while waiting for {what}); its output:\n{self.log_tail()}") from None

    def _read_some(self, wait: float, what: str) -> bool:
        """Take in what Chromium has sent, waiting up to ``wait`` seconds for something; dispatch every complete
        message. False when nothing came."""
        if not select.select([self._read_fd], [], [], max(0.0, wait))[0]:
            return False
        chunk = os.read(self._read_fd, 1 << 20)
        if not chunk:
            raise BrowserError(f"Chromium has exited (while waiting for {what}); its output:\n{self.log_tail()}")
        *messages, self._buffer = (self._buffer + chunk).split(b"\0")
        for raw in messages:
            self._dispatch(json.loads(raw))
        return True

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            if message["id"] not in self._abandoned:
                self._responses[message["id"]] = message
        elif message.get("sessionId") in self._pages:
            self._pages[message["sessionId"]]._event(message["method"], message.get("params", {}))

    def drain(self) -> None:
        """Take in every message already sent, without waiting."""
        while self._read_some(0, "pending messages"):
            pass

    def wait_for(self, done: Callable[[], bool], timeout: float | None = None, what: str = "an event") -> None:
        """Read and dispatch messages until ``done()`` is true."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserTimeout(f"timed out after {timeout:g} s waiting for {what}")
            self._read_some(left, what)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float | None = None, what: str | None = None) -> dict[str, Any]:
        """Send one CDP command and return its result; a CDP error is raised as :class:`BrowserError`."""
        if self.process is None:
            raise BrowserError(f"{method}: the browser is closed")
        timeout = self.timeout if timeout is None else timeout
        what = what or f"the answer to {method}"
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._write(json.dumps(message).encode() + b"\0", time.monotonic() + timeout, what)
        try:
            self.wait_for(lambda: ident in self._responses, timeout, what)
        except BrowserTimeout:
            # A late answer, should one come, is dropped rather than kept for nobody.
            self._abandoned.add(ident)
            raise
        response = self._responses.pop(ident)
        if "error" in response:
            raise BrowserError(f"{method} failed: {response['error'].get('message')} {response['error'].get('data', '')}".rstrip())
        return response.get("result", {})

    # ------------------------------------------------------------ pages

    def open(self, url: str, timeout: float | None = None) -> Page:
        """A new tab showing ``url``, returned once its load event has fired (images and scripts loaded)."""
        # A window of its own: a tab behind another is hidden, and a hidden page runs no animation frames.
        target = self.call("Target.createTarget", {"url": "about:blank", "newWindow": True})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        self._pages[session] = page
        try:
            # Listening starts before the navigation, so that what the page does while loading is heard.
            for method in ("Page.enable", "Runtime.enable", "Log.enable"):
                page.call(method)
            page.call("Page.setLifecycleEventsEnabled", {"enabled": True})
            page.navigate(url, timeout)
        except BaseException:
            page.__exit__(BrowserError)  # closed, quietly: the failure to open is the one to see
            raise
        return page


class Page:
    """One tab. ``errors``: every console error and uncaught exception so far, as strings."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.url: str | None = None
        self._errors: list[str] = []
        self._loaded: set[str] = set()  # loader ids whose load event fired
        self._crashed = False

    def __enter__(self) -> Page:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self.close()
        except BrowserError:
            if exc_type is None:
                raise  # else the failure that ended the block is the one to see (a crashed browser shows in both)

    @property
    def errors(self) -> list[str]:
        if self.browser.process is not None:
            self.browser.drain()
        return list(self._errors)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            frames = params.get("stackTrace", {}).get("callFrames") or [{}]
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self._errors.append(f"console.{params['type']}: {text}" + _where(frames[0].get("url"), frames[0].get("lineNumber")))
        elif method == "Runtime.exceptionThrown":
            self._errors.append(_exception_text(params["exceptionDetails"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self._errors.append(f"{entry['source']}: {entry['text']}" + _where(entry.get("url"), entry.get("lineNumber")))
        elif method == "Page.lifecycleEvent" and params["name"] == "load":
            self._loaded.add(params["loaderId"])
        elif method == "Inspector.targetCrashed":
            self._crashed = True

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None,
             what: str | None = None) -> dict[str, Any]:
        if self._crashed:
            raise BrowserError(f"{method}: the page {self.url} has crashed")
        return self.browser.call(method, params, self.session, timeout, what)

    def navigate(self, url: str, timeout: float | None = None) -> None:
        """Load ``url`` in this tab and wait for its load event."""
        self.url = url
        what = f"the load event of {url}"
        started = self.call("Page.navigate", {"url": url}, timeout, what)
        if started.get("errorText"):
            raise BrowserError(f"cannot load {url}: {started['errorText']}")
        # The load event of this navigation, not the one of the blank page it replaces.
        loader = started.get("loaderId")
        self.browser.wait_for(lambda: self._crashed or loader in self._loaded, timeout, what)
        if self._crashed:
            raise BrowserError(f"the page crashed while loading {url}")

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression, as JSON gives it (a promise is awaited first). An expression
        that throws raises :class:`JavaScriptError` with its message."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           timeout, f"Runtime.evaluate of {expression[:80]!r}")
        if "exceptionDetails" in result:
            raise JavaScriptError(f"{expression[:200]!r} threw: {_exception_text(result['exceptionDetails'])}")
        return _python_value(result["result"])

    def click(self, selector: str, timeout: float | None = None) -> None:
        """Click the first element matching a CSS selector as a person would: scrolled into view, a mouse press and
        release at its centre. Refused when nothing matches, when it has no size (hidden) or when something else
        is on top of its centre (the click would land there)."""
        found = self.evaluate(_LOCATE % json.dumps(selector), timeout)
        if "error" in found:
            raise BrowserError(f"cannot click {selector!r}: {found['error']}")
        x, y = found["x"], found["y"]
        for kind, buttons in (("mouseMoved", 0), ("mousePressed", 1), ("mouseReleased", 0)):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "buttons": buttons,
                                                   "clickCount": 0 if kind == "mouseMoved" else 1},
                      timeout, f"the {kind} of a click on {selector!r}")
        # A handler may finish its work in a later task or frame, as it may in front of a person; the caller
        # looks once that has happened.
        self.evaluate("new Promise(done => requestAnimationFrame(() => setTimeout(done, 0)))", timeout)

    def close(self) -> None:
        """Close the tab (its errors stay readable)."""
        if self.browser._pages.pop(self.session, None) is not None and self.browser.process is not None:
            self.browser.call("Target.closeTarget", {"targetId": self.target})


_LOCATE = """(() => {
  const el = document.querySelector(%s);
  if (!el) return {error: "no element matches it"};
  el.scrollIntoView({block: "center", inline: "center", behavior: "instant"});
  const box = el.getBoundingClientRect();
  if (box.width === 0 || box.height === 0) return {error: `it has no size (${box.width}x${box.height}): hidden?`};
  const x = box.left + box.width / 2, y = box.top + box.height / 2;
  const hit = document.elementFromPoint(x, y);
  if (!hit || !(hit === el || el.contains(hit) || hit.control === el))
    return {error: "its centre is covered by " + (hit ? hit.outerHTML.slice(0, 200) : "nothing (outside the viewport)")};
  return {x, y};
})()"""
