"""One protocol's board as a single static HTML page that opens from disk: a table sortable by any
column and an accuracy-vs-leakage scatter plot, with no server, no network and no external files.

The table is rendered here (escaped, so it reads without JavaScript too); the plot is drawn by the
page's script from the entries embedded as JSON. Entry strings come from submitters, so the table is
HTML-escaped, the JSON is escaped for a <script> element, the script writes text only through
``textContent``, and a Content-Security-Policy admits no script but the page's own (by hash) and no
network at all.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json

from ..cells.base import CLASS_REPRESENTATIVES, RECORD_RECONSTRUCTION
from .markdown import flag_text
from .ranking import (
    DEFAULT_RANKING, OVERALL, RANKINGS, THREAT_MODELS, attack_columns, board_summary, common_floor, leak_text, pareto,
    percent, rank, ranked_leak, ranking_rule, standings, worst_by_threat,
)
from .schema import Entry

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 80rem; padding: 0 1rem; color: #1b1b1b; }
table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { white-space: nowrap; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort=ascending] button::after { content: " \\25B2"; }
th[aria-sort=descending] button::after { content: " \\25BC"; }
tr.pareto td.front { color: #b35900; font-weight: 700; }
tr.below-floor { color: #777; }
#plot { max-width: 44rem; }
#plot .point { fill: #8aa4c8; stroke: #2b4f81; stroke-width: 1; }
#plot .point.pareto { fill: #e07b00; stroke: #7a3f00; }
#plot .point.below-floor { fill: #fff; }
#plot .front-line { fill: none; stroke: #e07b00; stroke-width: 1.5; }
#plot .floor-line { stroke: #999; stroke-dasharray: 4 3; }
#plot .axis { stroke: #333; }
#plot text { font-size: 11px; fill: #333; }
"""

# Reads the embedded entries, makes every header sort its column (ties by the current ranking), lets the
# reader rank by any threat model (the "Rank by" choice re-orders the rows, re-numbers the ranks and
# re-draws the plot and its Pareto front) and draws the plot.
_SCRIPT = r"""
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var board = JSON.parse(document.getElementById("board-data").textContent);
  var table = document.getElementById("board");
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var choice = document.getElementById("rank-by");
  var by = board.default_ranking;

  function compare(a, b, column, numeric) {
    var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
    if (x === "" || y === "") { return x === y ? 0 : (x === "" ? 1 : -1); }  // missing values last
    return numeric ? Number(x) - Number(y) : (x < y ? -1 : x > y ? 1 : 0);
  }
  function order(row) { return Number(row.getAttribute("data-order-" + by)); }

  function sortBy(th, direction) {
    var column = headers.indexOf(th), numeric = th.getAttribute("data-type") === "number";
    direction = direction || (th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending");
    headers.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", direction);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var c = compare(a, b, column, numeric);
      if (direction === "descending" && a.cells[column].getAttribute("data-value") !== ""
          && b.cells[column].getAttribute("data-value") !== "") { c = -c; }
      return c || order(a) - order(b);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  headers.forEach(function (th) { th.addEventListener("click", function () { sortBy(th); }); });

  function rankBy(key) {
    by = key;
    Array.prototype.slice.call(table.tBodies[0].rows).forEach(function (row) {
      var rankCell = row.cells[0], star = row.cells[1], onFront = row.getAttribute("data-pareto-" + by) === "1";
      rankCell.textContent = row.getAttribute("data-rank-" + by);
      rankCell.setAttribute("data-value", row.getAttribute("data-order-" + by));
      star.textContent = onFront ? "\u2605" : "";
      star.setAttribute("data-value", onFront ? "1" : "0");
      row.classList.toggle("pareto", onFront);
    });
    var rule = document.getElementById("rule");
    if (rule) { rule.textContent = board.ranking_rules[by]; }
    sortBy(headers[0], "ascending");
    draw();
  }
  choice.addEventListener("change", function () { rankBy(choice.value); });

  function el(name, attrs, parent, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    parent.appendChild(node);
    return node;
  }
  function pct(v) { return (100 * v).toFixed(1) + "%"; }

  var svg = document.getElementById("plot");
  var W = 640, H = 400, left = 56, right = 16, top = 16, bottom = 48;

  function draw() {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    svg.setAttribute("data-ranking", by);
    var entries = board.entries.filter(function (e) { return e.leak[by] !== null; });
    if (!entries.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg, "No entries yet.");
      svg.setAttribute("data-drawn", "0");
      return;
    }
    var floor = board.accuracy_floor;
    var lowest = Math.min.apply(null, entries.map(function (e) { return e.accuracy; }).concat(floor === null ? [] : [floor]));
    var yLo = Math.max(0, Math.floor((lowest - 0.05) * 10) / 10), yHi = 1;
    function px(leak) { return left + leak * (W - left - right); }
    function py(acc) { return top + (yHi - acc) / (yHi - yLo) * (H - top - bottom); }

    el("line", {x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, "class": "axis"}, svg);
    el("line", {x1: left, y1: top, x2: left, y2: H - bottom, "class": "axis"}, svg);
    for (var i = 0; i <= 5; i++) {
      el("text", {x: px(i / 5), y: H - bottom + 16, "text-anchor": "middle"}, svg, (20 * i) + "%");
    }
    var tenths = Math.round((yHi - yLo) * 10), step = tenths > 5 ? 2 : 1;  // ticks on round percentages
    for (var k = 0; k <= tenths; k += step) {
      var a = yLo + k / 10;
      el("text", {x: left - 6, y: py(a) + 4, "text-anchor": "end"}, svg, Math.round(100 * a) + "%");
    }
    el("text", {x: (left + W - right) / 2, y: H - 10, "text-anchor": "middle"}, svg,
       "worst leak rate, " + board.ranking_labels[by] + " (lower is better)");
    el("text", {x: 14, y: (top + H - bottom) / 2, "text-anchor": "middle",
                transform: "rotate(-90 14 " + (top + H - bottom) / 2 + ")"}, svg, "accuracy");
    if (floor !== null) {
      el("line", {x1: left, y1: py(floor), x2: W - right, y2: py(floor), "class": "floor-line"}, svg);
      el("text", {x: W - right - 4, y: py(floor) - 4, "text-anchor": "end"}, svg, "accuracy floor " + pct(floor));
    }
    var front = entries.filter(function (e) { return e.pareto[by]; })
                       .sort(function (a, b) { return a.leak[by] - b.leak[by] || a.accuracy - b.accuracy; });
    el("polyline", {"class": "front-line",
                    points: front.map(function (e) { return px(e.leak[by]) + "," + py(e.accuracy); }).join(" ")}, svg);
    entries.forEach(function (e) {
      var circle = el("circle", {cx: px(e.leak[by]), cy: py(e.accuracy), r: 6,
                                 "class": "point" + (e.pareto[by] ? " pareto" : "") + (e.flagged ? " below-floor" : ""),
                                 "data-name": e.name}, svg);
      el("title", {}, circle, e.name + (e.pareto[by] ? " (Pareto front)" : "") + ": accuracy " + pct(e.accuracy)
         + ", worst leak " + pct(e.leak[by]) + " (" + board.ranking_labels[by] + ")");
    });
    svg.setAttribute("data-drawn", String(entries.length));
  }
  draw();
})();
"""


def _script_json(obj) -> str:
    """JSON that cannot end its <script> element or open a comment there, whatever the strings hold."""
    text = json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _cell(text: str, value, *, numeric: bool = False, cls: str = "") -> str:
    """A table cell: ``text`` shown, ``value`` sorted on (empty when missing)."""
    sort_value = "" if value is None else (repr(float(value)) if numeric else str(value))
    classes = " ".join(c for c in (("num" if numeric else ""), cls) if c)
    return (f'<td{f" class={chr(34)}{classes}{chr(34)}" if classes else ""} '
            f'data-value="{html.escape(sort_value)}">{html.escape(text)}</td>')


RANKING_LABELS = {RECORD_RECONSTRUCTION: "record reconstruction", CLASS_REPRESENTATIVES: "class representatives",
                  OVERALL: "overall (every attack)"}


def _slug(by: str) -> str:
    """A ranking's name as an HTML attribute suffix and option value."""
    return by.replace(" ", "-")


def render_html(protocol: str, entries: list[Entry], *, superseded_by: str | None = None) -> str:
    """The page for one protocol's board."""
    attacks = attack_columns(entries)
    columns = ([("#", "number"), ("★", "number"), ("entry", "text"), ("authors", "text"), ("defense", "text"),
                ("accuracy", "number"), ("drop", "number"), ("worst-case leak", "number")]
               + [(f"worst, {m}", "number") for m in THREAT_MODELS]
               + [(f"{a} leak", "number") for a in attacks] + [("ε", "number"), ("flags", "text")])
    head = "".join(
        f'<th scope="col" data-type="{kind}" aria-sort="{"ascending" if i == 0 else "none"}">'
        f'<button type="button">{html.escape(label)}</button></th>'
        for i, (label, kind) in enumerate(columns))
    # every ranking's order, shown rank and Pareto front, so the page can switch between them
    placed = {by: {e.name: (i, shown) for i, (e, shown) in enumerate(standings(entries, by), start=1)}
              for by in RANKINGS}
    fronts = {by: pareto(entries, by) for by in RANKINGS}
    default = DEFAULT_RANKING
    rows = []
    for e, shown in standings(entries, default):
        on_front = e.name in fronts[default]
        link = e.data["link"]
        name = html.escape(e.name)
        entry_html = f'<a href="{html.escape(link)}" rel="nofollow noopener">{name}</a>' if link else name
        cells = [
            _cell(shown, placed[default][e.name][0], numeric=True),
            _cell("★" if on_front else "", 1 if on_front else 0, numeric=True, cls="front"),
            f'<td class="name" data-value="{name}">{entry_html}</td>',
            _cell(e.data["authors"], e.data["authors"]),
            _cell(e.defense_label, e.defense_label),
            _cell(percent(e.accuracy), e.accuracy, numeric=True),
            _cell(f"{100 * e.data['accuracy']['drop']:+.1f} pp", e.data["accuracy"]["drop"], numeric=True),
            _cell(f"{percent(e.worst_leak)} ({e.worst_attack})", e.worst_leak, numeric=True),
        ]
        worst = worst_by_threat(e)
        for model in THREAT_MODELS:
            attack, scores = worst.get(model, ("", {}))
            leak = scores["leak_rate"] if scores else None
            text = f"{leak_text(leak, scores.get('targets'))} ({attack})" if scores else "–"
            cells.append(_cell(text, leak, numeric=True))
        for a in attacks:
            scores = e.data["attacks"].get(a)
            leak = scores["leak_rate"] if scores else None
            cells.append(_cell(leak_text(leak, scores.get("targets")) if scores else "–", leak, numeric=True))
        cells.append(_cell(f"{e.epsilon:.3g}" if e.epsilon is not None else "–", e.epsilon, numeric=True))
        flags = flag_text(e)
        cells.append(_cell(flags, flags))
        classes = " ".join(c for c in ("pareto" if on_front else "", "below-floor" if e.flagged else "") if c)
        per_ranking = "".join(
            f' data-order-{_slug(by)}="{placed[by][e.name][0]}" data-rank-{_slug(by)}="{html.escape(placed[by][e.name][1])}"'
            f' data-pareto-{_slug(by)}="{int(e.name in fronts[by])}"' for by in RANKINGS)
        rows.append(f'<tr data-name="{name}"{per_ranking}'
                    f'{f" class={chr(34)}{classes}{chr(34)}" if classes else ""}>{"".join(cells)}</tr>')

    def leak_under(e: Entry, by: str) -> float | None:
        leak = ranked_leak(e, by)
        return None if leak is None else leak.leak_rate

    data = {
        "protocol": protocol,
        "accuracy_floor": common_floor(entries),  # null: entries differ, the plot draws no floor line
        "default_ranking": _slug(default),
        "ranking_labels": {_slug(by): label for by, label in RANKING_LABELS.items()},
        "ranking_rules": {_slug(by): ranking_rule(by) for by in RANKINGS},
        "entries": [{"name": e.name, "accuracy": e.accuracy, "flagged": e.flagged,
                     "leak": {_slug(by): leak_under(e, by) for by in RANKINGS},
                     "pareto": {_slug(by): e.name in fronts[by] for by in RANKINGS}}
                    for e in rank(entries, default)],
    }
    options = "".join(f'<option value="{_slug(by)}"{" selected" if by == default else ""}>{html.escape(RANKING_LABELS[by])}'
                      f'</option>' for by in RANKINGS)
    csp = (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
           f"img-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'")
    title = f"leakbench leaderboard: {protocol}"
    empty = "" if entries else '<p id="empty">No entries yet.</p>\n'
    ranking = (f'<p><strong>Ranking.</strong> <span id="rule">{html.escape(ranking_rule(default))}</span></p>\n'
               if entries else "")
    summary = board_summary(protocol, entries, superseded_by=superseded_by).replace("`", "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(summary)}</p>\n{ranking}{empty}"
        f'<p><label for="rank-by">Rank by the worst leak rate of </label><select id="rank-by">{options}</select></p>\n'
        f'<table id="board">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>\n"
        '<p>Click a column header to sort by it; click again to reverse. Points: entries; orange: the Pareto '
        'front; hollow: flagged (below the accuracy floor, or training diverged). Hover a point for its name.</p>\n'
        f'<svg id="plot" viewBox="0 0 640 400" role="img" aria-label="accuracy against worst leak rate"></svg>\n'
        f'<script type="application/json" id="board-data">{_script_json(data)}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )
