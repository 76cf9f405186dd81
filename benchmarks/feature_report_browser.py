"""Open a feature report in headless Chromium from file://, navigate from the index to a
hookpoint's feature list and on to a feature page by clicking links, check that the contexts
render with no console error, and save a screenshot.

    python benchmarks/feature_report_browser.py <report_dir> [--png benchmarks/feature_report.png]

Chromium runs headless, sandbox-less, with an empty user-data dir and no network features; the
script talks to it over the Chrome DevTools Protocol on a pipe (`--remote-debugging-pipe`: fd 3
in, fd 4 out, NUL-separated JSON), so it needs nothing beyond the standard library. Console
errors are caught three ways: Runtime.exceptionThrown, console.error calls and Log entries of
level error (e.g. a data file that failed to load), plus the page's own #console-errors box.
Exit status 0 when the feature page rendered contexts with no error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
    "--remote-debugging-pipe",
]
TIMEOUT_S = 60.0


class DevTools:
    """A Chromium process and one page session over the DevTools pipe."""

    def __init__(self, chromium: str, user_data_dir: Path):
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]

        def wire() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes replies
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for fd in (to_chrome_r, from_chrome_w, *high):
            os.close(fd)
        self._buf, self._next_id, self.session = b"", 0, None
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError(
                    "Chromium closed the DevTools pipe: "
                    + self.proc.stderr.read().decode(errors="replace")[-2000:]
                )
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """Send one command and wait for its result (events meanwhile go to self.events)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open_page(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll `expression` until truthy (an exception, e.g. mid-navigation, counts as not
        yet)."""
        deadline, last = time.monotonic() + TIMEOUT_S, None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:
                value, last = None, e
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what} (last error: {last})")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", session=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._in)
        os.close(self._out)


READY = (
    "document.documentElement?.dataset.ready === '1' && "
    "document.documentElement?.dataset.view === '{view}'"
)


def check_report(report_dir: Path, png: Path | None, chromium: str = "chromium") -> dict[str, Any]:
    """Index -> first hookpoint -> first feature of its list (sorted by density); returns what
    the feature page shows and every console error."""
    url = (Path(report_dir).resolve() / "index.html").as_uri()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = DevTools(shutil.which(chromium) or chromium, Path(profile))
        try:
            browser.open_page()
            browser.call("Page.navigate", {"url": url})
            browser.wait_for(READY.format(view="index"), "the index")
            hookpoint = browser.evaluate("document.querySelector('a.hp-link').textContent")
            browser.evaluate("document.querySelector('a.hp-link').click()")
            browser.wait_for(READY.format(view="hp"), "the feature list")
            feature = browser.evaluate(
                "document.querySelector('#feature-table a.feature-link').textContent"
            )
            browser.evaluate("document.querySelector('#feature-table a.feature-link').click()")
            browser.wait_for(READY.format(view="f"), "the feature page")
            page = browser.evaluate("""(() => {
                const ctx = [...document.querySelectorAll('#top-contexts .ctx')];
                return {hash: location.hash, title: document.querySelector('h1').textContent,
                        contexts: ctx.length,
                        tokens: ctx.length ? ctx[0].querySelectorAll('.tok').length : 0,
                        centre: ctx.length ? ctx[0].querySelector('.tok.centre')?.textContent : null,
                        highlighted: document.querySelectorAll('#top-contexts .tok[style]').length,
                        quantile_contexts: document.querySelectorAll('#quantile-contexts .ctx').length,
                        histogram_bars: document.querySelectorAll('svg.hist rect').length,
                        logit_rows: document.querySelectorAll('table.logits tr').length - 1,
                        page_errors: document.getElementById('console-errors').textContent};
            })()""")
            if png is not None:
                shot = browser.call("Page.captureScreenshot", {"format": "png"})
                Path(png).write_bytes(base64.b64decode(shot["data"]))
            errors = browser.errors()
        finally:
            browser.close()
    return {
        "url": url,
        "hookpoint": hookpoint,
        "feature": feature,
        **page,
        "console_errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("feature_report.png"))
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    result = check_report(args.report_dir, args.png, args.chromium)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    ok = result["contexts"] > 0 and not result["console_errors"] and not result["page_errors"]
    print(("OK" if ok else "FAILED") + f": screenshot {args.png}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
