"""A headless Chromium for tests, driven over the DevTools protocol on pipes, with the standard library only.

Chromium started with ``--remote-debugging-pipe`` reads protocol messages on its fd 3 and writes them on its
fd 4: JSON objects, each ended by a NUL byte. :class:`Browser` starts it with those two pipes, sends commands
({"id", "method", "params", "sessionId"}) and waits for their answers, and keeps every event it receives
(console messages, exceptions, log entries) for the test to read. Every wait has a deadline; when it passes,
or the browser dies, the browser is killed and the test fails with what was being waited for.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional

#: Names under which Debian and others install the browser.
EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install Chromium (Debian: apt-get install -y chromium)"


def find_chromium() -> Optional[str]:
    """The path of a Chromium on PATH, or None."""
    for name in EXECUTABLES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(AssertionError):
    """The browser did not answer in time, died, or answered a command with an error."""


class Browser:
    """One headless Chromium process and its protocol pipes; use as a context manager (it is always killed)."""

    def __init__(self, executable: str, timeout: float = 30.0):
        self.timeout = timeout
        self.events: List[Dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        self._profile = tempfile.mkdtemp(prefix="gapbench-browser-")
        self._stderr = tempfile.TemporaryFile()
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # The child's ends, moved to 10 and above (closed at exec), so that putting them at 3 and 4 in the child
        # cannot overwrite either; dup2 leaves those two open across exec. close_fds must be off, or the child
        # would close 3 and 4 after wiring them (pass_fds keeps fds by their number in the parent, not these).
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire() -> None:  # in the child, before exec: fd 3 what the browser reads, fd 4 what it writes
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={self._profile}", "about:blank"]
        try:
            # a session of its own: a kill reaches the browser's helper processes too
            self._proc = subprocess.Popen(args, preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._write_fd = to_browser_w
        self._read_fd = from_browser_r

    # ------------------------------------------------------------ protocol

    def send(self, method: str, params: Optional[Dict] = None, session: Optional[str] = None) -> Dict:
        """Send a command and return its result; events that arrive meanwhile are kept in :attr:`events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write_fd, data):]
        answer = self._receive(lambda m: m.get("id") == self._next_id, f"the answer to {method}")
        if "error" in answer:
            raise BrowserError(f"{method} failed: {answer['error']}")
        return answer.get("result", {})

    def wait_event(self, method: str, session: Optional[str] = None) -> Dict:
        """The first event ``method`` (of ``session``) not yet waited for, waiting for it if it has not come."""
        def wanted(m):
            return m.get("method") == method and (session is None or m.get("sessionId") == session)

        for event in self.events:
            if wanted(event) and not event.get("_waited"):
                event["_waited"] = True
                return event
        event = self._receive(wanted, f"the event {method}")
        event["_waited"] = True
        return event

    def _receive(self, wanted, what: str) -> Dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" not in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"waited {self.timeout:g} s for {what} from the browser in vain")
            ready, _, _ = select.select([self._read_fd], [], [], left)
            if ready:
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    self._fail(f"the browser closed its pipe (exit status {self._proc.poll()}) while the test "
                               f"waited for {what}")
                self._buffer += chunk

    def _fail(self, message: str) -> None:
        self.close()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-15:]
        raise BrowserError(message + ("; its last lines on stderr:\n" + "\n".join(tail) if tail else ""))

    # ------------------------------------------------------------ pages

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab with Runtime, Log and Page events on, wait for its load event; its session."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=session)
        answer = self.send("Page.navigate", {"url": url}, session=session)
        if answer.get("errorText"):
            raise BrowserError(f"the browser could not open {url}: {answer['errorText']}")
        self.wait_event("Page.loadEventFired", session)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page (returned by value); an exception fails."""
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=session)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def errors(self) -> List[str]:
        """Every console error, uncaught exception and error log entry (a blocked load, a bad resource) so far."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(f"exception: {params.get('exceptionDetails', {}).get('text')} "
                           f"{params.get('exceptionDetails', {}).get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console." + params["type"] + ": "
                           + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        return out

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Ask the browser to quit, kill it if it has not within a few seconds; remove its profile."""
        if self._proc.poll() is None:
            try:
                data = json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0"
                os.write(self._write_fd, data)
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()  # still running, or helpers it left behind
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._write_fd = self._read_fd = -1
        shutil.rmtree(self._profile, ignore_errors=True)

    def _kill(self) -> None:
        """Kill the browser's process group (it leads its own session, so this is the browser and its helpers)."""
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._proc.wait()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        if self._write_fd != -1:
            self.close()
        self._stderr.close()
