"""The static HTML board: escaped, self-contained, and (in headless Chromium, driven over the DevTools
protocol on a pipe: no extra Python packages) it loads from disk, shows one row per entry, sorts by a
column when its header is clicked with real mouse events, and draws the plot. Skipped where
Chromium is absent (`.ci/run` installs Debian's `chromium`)."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from leakbench.cells.base import CLASS_REPRESENTATIVES, RECORD_RECONSTRUCTION
from leakbench.leaderboard.html import render_html
from leakbench.leaderboard.publish import render_boards
from leakbench.leaderboard.ranking import OVERALL, pareto, rank, ranked_leak, ranking_rule, standings
from leakbench.leaderboard.schema import load_board

_spec = importlib.util.spec_from_file_location("_board_fixtures", Path(__file__).with_name("_board_fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

PAYLOAD = '<img src=x onerror="window.__pwned=1">'
SCRIPT_BREAK = "</script><script>window.__pwned=2</script>"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Six fixture entries plus one whose submitter strings try to inject markup."""
    root = tmp_path_factory.mktemp("leaderboards")
    entries = fx.board_entries()
    entries["hostile"] = fx.make_entry("hostile", 0.86, {"dlg": 0.75, "dlg-adaptive": 0.75, "gan-active": 0.2},
                                       authors=PAYLOAD + SCRIPT_BREAK, params={PAYLOAD: SCRIPT_BREAK})
    entries["hostile"]["reported"] = {"note": PAYLOAD}
    fx.write_board(root, entries)
    render_boards(root)
    return root, load_board(fx.PROTOCOL, root)


def test_page_is_self_contained_and_escapes_submitter_strings(board):
    root, entries = board
    page = (root / fx.PROTOCOL / "index.html").read_text()
    assert "<img" not in page and "onerror=\"window" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the page's script
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in page
    # nothing to fetch: no external URL in any src/href but the entries' own links, and a CSP forbidding it
    assert "src=\"http" not in page and "@import" not in page and "url(" not in page
    assert "default-src &#x27;none&#x27;" in page and "connect-src &#x27;none&#x27;" in page
    data = json.loads(page.split('<script type="application/json" id="board-data">', 1)[1].split("</script>", 1)[0])
    assert [e["name"] for e in data["entries"]] == [e.name for e in rank(entries)]
    assert {e["name"] for e in data["entries"] if e["pareto"]["record-reconstruction"]} == pareto(entries)
    assert {e["name"] for e in data["entries"] if e["pareto"]["class-representatives"]} == \
        pareto(entries, CLASS_REPRESENTATIVES)


def test_empty_board_says_so():
    page = render_html("v1", [])
    assert "No entries yet." in page and "<tr data-name" not in page


# --- headless Chromium over the DevTools protocol ------------------------------------------------

class DevTools:
    """A headless Chromium driven over ``--remote-debugging-pipe``: JSON messages ended by NUL on
    file descriptors 3 (to the browser) and 4 (from it)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 "--window-size=1400,1000"]
        self._log = open(profile.parent / "chromium.log", "w+b")

        def pipe_ends_on_3_and_4():  # where Chromium expects them; dup2 leaves them open across exec
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]  # may sit on 3/4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # close_fds would close 3 and 4 after preexec_fn; the parent's own fds are close-on-exec anyway
        self.proc = subprocess.Popen([binary, *flags], preexec_fn=pipe_ends_on_3_and_4, close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = None

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=5)
        except Exception:  # noqa: BLE001  a browser that already died is fine to close
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium; its log ends:\n{self.log_tail()}")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited; its log ends:\n{self.log_tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, *, browser: bool = False, timeout: float = 20, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", browser=True, url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", browser=True, targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 20
        while self.js("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load")
            time.sleep(0.05)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real left click (trusted mouse events, hit-tested) at the centre of the element."""
        box = self.js(f"(function () {{ var el = document.querySelector({json.dumps(selector)});"
                      f" el.scrollIntoView({{block: 'center'}}); var r = el.getBoundingClientRect();"
                      f" return [r.left + r.width / 2, r.top + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium); .ci/run installs it")
    devtools = DevTools(CHROMIUM, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield devtools
    finally:
        devtools.close()


ROW_NAMES = "Array.from(document.querySelectorAll('#board tbody tr')).map(function (r) { return r.dataset.name; })"


def header_selector(column: int) -> str:
    return f"#board thead th:nth-child({column}) button"


def column_index(browser, label: str) -> int:
    labels = browser.js("Array.from(document.querySelectorAll('#board thead th')).map(function (th) "
                        "{ return th.textContent; })")
    return labels.index(label) + 1


def test_page_in_chromium_loads_sorts_and_plots(board, browser):
    root, entries = board
    page = root / fx.PROTOCOL / "index.html"
    browser.open(page.as_uri())
    ranked = [e.name for e in rank(entries)]

    # loads: one row per entry, in rank order; the hostile strings stayed text
    assert browser.js(ROW_NAMES) == ranked
    assert browser.js("document.querySelectorAll('img').length") == 0
    assert browser.js("window.__pwned === undefined") is True

    # clicking a header sorts by it, then reverses; ties keep rank order; aria-sort follows
    by_name = {e.name: e for e in entries}
    position = {name: i for i, name in enumerate(ranked)}
    for label, value in (("accuracy", lambda e: e.accuracy), ("worst-case leak", lambda e: e.worst_leak),
                         ("entry", lambda e: e.name)):
        column = column_index(browser, label)
        selector = header_selector(column)
        for direction, sign in (("ascending", 1), ("descending", -1)):
            browser.click(selector)
            shown = browser.js(ROW_NAMES)
            if label == "entry":
                expected = sorted(ranked, reverse=sign < 0)
            else:
                expected = sorted(ranked, key=lambda n: (sign * value(by_name[n]), position[n]))
            assert shown == expected, (label, direction)
            assert browser.js(f"document.querySelector('#board thead th:nth-child({column})')"
                              f".getAttribute('aria-sort')") == direction
            assert browser.js("document.querySelectorAll('#board thead th[aria-sort=ascending],"
                              " #board thead th[aria-sort=descending]').length") == 1

    # the plot: one point per entry where its numbers put it, Pareto points marked, names in tooltips
    points = browser.js("Array.from(document.querySelectorAll('#plot circle.point')).map(function (c) {"
                        " return [c.dataset.name, c.classList.contains('pareto'), Number(c.getAttribute('cx')),"
                        " Number(c.getAttribute('cy')), c.querySelector('title').textContent]; })")
    assert sorted(p[0] for p in points) == sorted(ranked)
    assert {p[0] for p in points if p[1]} == pareto(entries)
    assert all(p[4].startswith(p[0]) for p in points)
    xy = {p[0]: (p[2], p[3]) for p in points}
    for a in entries:  # more leakage (the ranked one) lies further right, more accuracy higher up (smaller y)
        for b in entries:
            if ranked_leak(a).leak_rate < ranked_leak(b).leak_rate:
                assert xy[a.name][0] < xy[b.name][0]
            if a.accuracy > b.accuracy:
                assert xy[a.name][1] < xy[b.name][1]
    assert browser.js("document.querySelector('#plot polyline.front-line').getAttribute('points')"
                      ".trim().split(' ').length") == len(pareto(entries))
    assert browser.js("document.querySelector('#plot').getAttribute('data-drawn')") == str(len(entries))
    assert browser.js("document.querySelectorAll('#plot .floor-line').length") == 1

    # the "Rank by" choice: rows, ranks, stars and plot follow the chosen threat model, and back
    shown_ranks = "Array.from(document.querySelectorAll('#board tbody tr')).map(function (r) { return r.cells[0].textContent; })"
    for by in (RECORD_RECONSTRUCTION, CLASS_REPRESENTATIVES, OVERALL, RECORD_RECONSTRUCTION):
        browser.js(f"(function () {{ var s = document.getElementById('rank-by'); s.value = '{by.replace(' ', '-')}';"
                   f" s.dispatchEvent(new Event('change')); return 0; }})()")
        assert browser.js(ROW_NAMES) == [e.name for e in rank(entries, by)], by
        assert browser.js(shown_ranks) == [r for _, r in standings(entries, by)], by
        stars = browser.js("Array.from(document.querySelectorAll('#board tbody tr')).filter(function (r) "
                           "{ return r.cells[1].textContent === '\u2605'; }).map(function (r) { return r.dataset.name; })")
        assert set(stars) == pareto(entries, by), by
        assert browser.js("document.querySelector('#plot').getAttribute('data-ranking')") == by.replace(" ", "-")
        plotted = browser.js("Array.from(document.querySelectorAll('#plot circle.point.pareto')).map(function (c) "
                             "{ return c.dataset.name; })")
        assert set(plotted) == pareto(entries, by), by
        assert browser.js("document.getElementById('rule').textContent") == ranking_rule(by)

    # no script error, and nothing was requested but the page itself
    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not errors, errors
    requests = {e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"}
    assert requests == {page.as_uri()}


def test_empty_page_in_chromium(tmp_path, browser):
    render_boards(tmp_path, protocols=["v1"])
    browser.events.clear()
    browser.open((tmp_path / "v1" / "index.html").as_uri())
    assert browser.js(ROW_NAMES) == []
    assert browser.js("document.getElementById('empty').textContent") == "No entries yet."
    assert browser.js("document.querySelector('#plot').getAttribute('data-drawn')") == "0"
    assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]


def test_page_without_a_common_floor_in_chromium(tmp_path, browser):
    # floors measured apart differ slightly: the plot then draws no floor line, and still every point
    fx.write_entry(tmp_path, fx.make_entry("a", 0.9, {"dlg": 0.5}))
    fx.write_entry(tmp_path, fx.make_entry("b", 0.55, {"dlg": 0.0}, floor=0.6))
    render_boards(tmp_path)
    browser.events.clear()
    browser.open((tmp_path / fx.PROTOCOL / "index.html").as_uri())
    assert browser.js(ROW_NAMES) == ["a", "b"]
    assert browser.js("document.querySelectorAll('#plot circle.point').length") == 2
    assert browser.js("document.querySelectorAll('#plot .floor-line').length") == 0
    assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
