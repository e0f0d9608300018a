"""A real headless browser for tests: Chromium driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe`` makes Chromium read protocol commands from its file descriptor 3 and
write answers to 4, each a JSON message ended by a NUL byte: no driver binary, no websocket, no
Python package beyond the standard library. :func:`find_chromium` says where the browser is (None:
tests skip, saying so).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on PATH; None when there is none."""
    return next((p for p in map(shutil.which, NAMES) if p), None)


class Chromium:
    """One headless browser with one page. ``with Chromium(path) as b: b.open(url)``."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="genrefine-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._res_r, res_w = os.pipe()  # Chromium writes answers on fd 4, we read
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--mute-audio",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        # bash puts the pipe ends on the descriptors Chromium expects
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{res_w} {cmd_r}<&- {res_w}>&-', "chromium", *args],
            pass_fds=(cmd_r, res_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._next = 0
        self.session = None
        self.width, self.height = width, height

    # -------------------------------------------------------------- the protocol
    def send(self, method: str, params: dict | None = None, session: bool = True,
             timeout: float = 60.0) -> dict:
        """Send one command; its ``result`` (an error answer raises RuntimeError)."""
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._next:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error'].get('message')}")
                    return answer.get("result", {})
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not answer {method}")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe")
                self._buf += chunk

    def open(self, url: str) -> None:
        """Open ``url`` in a new page and wait until it has loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> None:
        """Poll until the expression is true in the page; RuntimeError after ``timeout`` s."""
        end = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > end:
                raise RuntimeError(f"gave up waiting for {expression}")
            time.sleep(0.05)

    def screenshot(self, path: str, full_page: bool = True) -> None:
        """Save the page as a PNG (the whole page's height when ``full_page``)."""
        if full_page:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": max(height, 1), "deviceScaleFactor": 1,
                       "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    # -------------------------------------------------------------- life cycle
    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", session=False, timeout=5.0)
                except RuntimeError:
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._res_r)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
