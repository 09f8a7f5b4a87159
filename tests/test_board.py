"""The leaderboard's entry schema, its ranking rule and Pareto front, the Markdown board, and the
`leakbench leaderboard` command (render; verify is dispatched to leaderboard.verify)."""
from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest

from leakbench.cli import main
from leakbench.errors import ConfigError
from leakbench.cells.base import CLASS_REPRESENTATIVES
from leakbench.leaderboard.markdown import render_markdown
from leakbench.leaderboard.ranking import OVERALL, RANKING_RULE, pareto, rank, ranked_leak, standings
from leakbench.leaderboard.schema import Entry, load_board, load_entry, validate_entry
from leakbench.registry import ATTACKS

_spec = importlib.util.spec_from_file_location("_board_fixtures", Path(__file__).with_name("_board_fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


def entry(name="clipped-noise", accuracy=0.91, leaks=None, **kw) -> dict:
    return fx.make_entry(name, accuracy, leaks or {"dlg": 0.25, "dlg-adaptive": 0.5, "gan-active": 0.1}, **kw)


def as_entry(data: dict) -> Entry:
    return validate_entry(data, source=f"{data['name']}.json")


# --- schema ---------------------------------------------------------------------------------------

def test_fixture_entries_are_valid_and_round_trip(tmp_path):
    paths = fx.write_board(tmp_path)
    for path in paths:
        e = load_entry(path)
        assert e.data == json.loads(path.read_text())
        assert e.worst_leak == max(a["leak_rate"] for a in e.data["attacks"].values())
    assert {e.name for e in load_board(fx.PROTOCOL, tmp_path)} == set(fx.BOARD)


def test_nullable_scores_and_privacy_are_accepted():
    data = entry(epsilon=1.9)
    data["attacks"]["dlg"]["psnr_median"] = None  # an attack that produced no reconstruction
    data["privacy"]["delta"] = None
    data["link"] = None
    assert as_entry(data).epsilon == 1.9


def _set(path: str, value):
    def patch(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return patch


_DELETE = object()
BAD = {
    "string-number": (_set("accuracy.value", "0.91"), "accuracy.value is \"0.91\" (a string); allowed: a number"),
    "string-leak": (_set("attacks.dlg.leak_rate", "25%"), "attacks.dlg.leak_rate is \"25%\" (a string)"),
    "bool-number": (_set("attacks.dlg.psnr_median", True), "attacks.dlg.psnr_median is true"),
    "rate-above-one": (_set("attacks.gan-active.oracle_accuracy", 1.5), "attacks.gan-active.oracle_accuracy is 1.5"),
    "unknown-top-key": (_set("score", 3), "score is not a known key; allowed: schema_version, protocol"),
    "unknown-attack-key": (_set("attacks.dlg.psnr", 30.0), "attacks.dlg.psnr is not a known key"),
    "missing-key": (_set("provenance", _DELETE), "provenance is missing"),
    "missing-scores": (_set("attacks.dlg.ssim_median", _DELETE), "attacks.dlg has no scores"),
    "worst-leak": (_set("worst_case.leak_rate", 0.25), "worst_case.leak_rate is 0.25; allowed: 0.5, the highest"),
    "worst-attack": (_set("worst_case.attack", "dlg"), "worst_case.attack is \"dlg\"; allowed: \"dlg-adaptive\""),
    "drop": (_set("accuracy.drop", 0.02), "accuracy.drop is 0.02; allowed: accuracy.baseline - accuracy.value"),
    "floor-flag": (_set("flags.below_accuracy_floor", True), "flags.below_accuracy_floor is true; allowed: false"),
    "variant": (_set("attacks.dlg.variant", "sometimes"), "attacks.dlg.variant is \"sometimes\"; allowed: \"fixed\""),
    "epsilon-string": (_set("privacy", {"epsilon": "1.9"}), "privacy.epsilon is \"1.9\" (a string)"),
    "link-scheme": (_set("link", "javascript:alert(1)"), "link is \"javascript:alert(1)\""),
    "html-name": (_set("name", "<img src=x onerror=alert(1)>"), "name is \"<img src=x onerror=alert(1)>\""),
    "source": (_set("defense.source", "gaussian-noise"), "defense.source is \"gaussian-noise\"; allowed: builtin:"),
    "seeds": (_set("provenance.seeds", ["0"]), "provenance.seeds is a list; allowed: a non-empty list of integers"),
    "naive-date": (_set("provenance.date", "2026-11-21 04:00"), "provenance.date is \"2026-11-21 04:00\""),
    "provenance-protocol": (_set("provenance.protocol", "v1"), "provenance.protocol is \"v1\""),
    "schema-version": (_set("schema_version", 2), "schema_version is 2; allowed: 1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_entries_give_one_line_naming_file_and_key(tmp_path, case):
    patch, message = BAD[case]
    data = entry()
    patch(data)
    path = fx.write_entry(tmp_path, data, protocol=fx.PROTOCOL, name="clipped-noise")
    with pytest.raises(ConfigError) as err:
        load_entry(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ") and message in text, text


def test_nan_and_file_placement_are_rejected(tmp_path):
    path = fx.write_entry(tmp_path, entry())
    path.write_text(path.read_text().replace('"wall_seconds": 123.4', '"wall_seconds": NaN'))
    with pytest.raises(ConfigError, match="NaN is not a JSON number"):
        load_entry(path)
    # a file whose protocol differs from its folder, or whose name differs from its file name
    wrong_folder = fx.write_entry(tmp_path, entry(), protocol="v1")
    with pytest.raises(ConfigError, match=r'protocol is "v3-smoke"; allowed: "v1", the folder'):
        load_entry(wrong_folder)
    wrong_file = fx.write_entry(tmp_path, entry(), name="other")
    with pytest.raises(ConfigError, match=r'name is "clipped-noise"; allowed: "other"'):
        load_entry(wrong_file)
    path.write_text(path.read_text().replace('"wall_seconds": NaN', '"wall_seconds": 1, "wall_seconds": 2'))
    with pytest.raises(ConfigError, match='key "wall_seconds" appears twice'):
        load_entry(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="the entry is a list; allowed: an object with keys schema_version"):
        load_entry(path)
    (tmp_path / "v3-smoke" / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_entry(tmp_path / "v3-smoke" / "broken.json")


def test_floors_measured_apart_each_flag_their_own_entry():
    # the floor is a fraction of each run's no-defense accuracy, so two submissions may differ slightly
    a, b = as_entry(entry("a", 0.55, {"dlg": 0.5})), as_entry(entry("b", 0.55, {"dlg": 0.0}, floor=0.6))
    assert [e.name for e in rank([b, a])] == ["a", "b"]  # b leaks less but misses its own floor
    assert b.below_floor and not a.below_floor
    assert "below the accuracy floor of 50.0%–60.0%" in render_markdown(fx.PROTOCOL, [a, b])


# --- ranking and the Pareto front ------------------------------------------------------------------

def fixture_board() -> list[Entry]:
    return [as_entry(d) for d in fx.board_entries().values()]


def test_ranking_rule_on_the_fixture_board():
    ranked = [e.name for e in rank(fixture_board())]
    # floor met: leak 0.125; leak 0.5 at 0.91 before 0.88; leak 1.0 at 0.94 before 0.90; then below floor
    assert ranked == ["dp-sgd-strong", "clipped-noise", "selective", "prune-light", "quant-int8", "noise-heavy"]


def test_ranking_ties_break_by_accuracy_then_name_and_floor_comes_first():
    same = [as_entry(entry(n, acc, {"dlg": 0.5})) for n, acc in (("b", 0.8), ("a", 0.8), ("c", 0.9))]
    assert [e.name for e in rank(same)] == ["c", "a", "b"]
    leaky_ok = as_entry(entry("leaky", 0.9, {"dlg": 1.0}))
    safe_low = as_entry(entry("safe-low", 0.3, {"dlg": 0.0}))
    assert [e.name for e in rank([safe_low, leaky_ok])] == ["leaky", "safe-low"]


def test_overlapping_intervals_share_a_rank():
    """A rank is 1 + the number of entries whose 95% interval lies wholly below: with 4 targets 0.125
    ([0-49%]) and 0.5 ([15-85%]) overlap, so they tie; 1.0 ([51-100%]) is clearly worse than 0.125 only."""
    shown = {e.name: r for e, r in standings(fixture_board())}
    assert shown == {"dp-sgd-strong": "=1", "clipped-noise": "=1", "selective": "=1", "prune-light": "=2",
                     "quant-int8": "=2", "noise-heavy": "–"}  # below the floor: not ranked
    # with 16 targets 0/16 [0-19%], 8/16 [28-72%] and 16/16 [81-100%] are all apart
    apart = [as_entry(entry(n, 0.9, {"dlg": leak}, targets=16)) for n, leak in (("z", 0.0), ("h", 0.5), ("o", 1.0))]
    assert [(e.name, r) for e, r in standings(apart)] == [("z", "1"), ("h", "2"), ("o", "3")]
    # the markdown's # column shows the same ranks
    rows = [line for line in render_markdown(fx.PROTOCOL, fixture_board()).splitlines() if line.startswith("| ") and "[" in line]
    assert [r.strip("|").split("|")[0].strip() for r in rows] == ["=1", "=1", "=1", "=2", "=2", "–"]


def test_board_ranks_by_record_reconstruction_and_can_rank_by_each_threat_model():
    """Model inversion (class representatives) leaking on every entry must not decide the ranking: the
    default ranks by the gradient attacks; the other threat models are rankings of their own."""
    records_safe = as_entry(entry("records-safe", 0.9, {"dlg": 0.0, "gan-active": 1.0}, targets=16))
    class_safe = as_entry(entry("class-safe", 0.9, {"dlg": 1.0, "gan-active": 0.0}, targets=16))
    board = [class_safe, records_safe]
    assert [e.name for e in rank(board)] == ["records-safe", "class-safe"]
    assert [e.name for e in rank(board, CLASS_REPRESENTATIVES)] == ["class-safe", "records-safe"]
    assert {e.name for e in rank(board, OVERALL)} == {"records-safe", "class-safe"}  # both leak 100% somewhere
    assert ranked_leak(records_safe).attack == "dlg" and ranked_leak(records_safe, OVERALL).leak_rate == 1.0
    assert pareto(board) == {"records-safe"} and pareto(board, CLASS_REPRESENTATIVES) == {"class-safe"}
    # an entry without attacks of a threat model has no rank under it, and sorts last
    only_records = as_entry(entry("only-records", 0.95, {"dlg": 0.0}, targets=16))
    assert dict((e.name, r) for e, r in standings([*board, only_records], CLASS_REPRESENTATIVES))["only-records"] == "–"


def _kinds():
    from leakbench.catalog import load_all
    from leakbench.registry import CELL_KINDS

    load_all()
    return {name: CELL_KINDS.get(name) for name in CELL_KINDS.list()}


@pytest.mark.parametrize("kind", sorted(_kinds()))
def test_every_kind_of_cells_board_scores_pass_the_entry_schema(kind):
    """What a kind of cell puts on a board (its board_scores, through build.attack_scores) is what the
    entry schema accepts: a new kind is checked the moment it registers (protocol v3's membership-loss
    entries were once refused for an unknown key 'auc')."""
    from leakbench.leaderboard.build import attack_scores

    cls = _kinds()[kind]
    attack = next(a for a in ATTACKS.list() if getattr(ATTACKS.get(a), "setting", None) == kind)
    metrics = {"leak_rate": 0.25, **{key: 0.5 for key, _ in cls.board_scores}}
    record = {"attack": attack, "targets": 16, "metrics": metrics, "threat": {"setting": kind}}
    data = fx.make_entry("kind-check", 0.9, {"another-attack": 0.5})
    data["attacks"][attack] = attack_scores(record)
    validate_entry(data, source="kind-check.json")
    assert set(data["attacks"][attack]) >= {key for key, _ in cls.board_scores}


def test_membership_has_its_own_worst_case_column_and_never_decides_the_default_rank(tmp_path):
    """Membership inference (issue 19) is a harm of its own: its worst case is shown apart, and an entry
    that leaks membership but no record is still ranked by its record reconstruction."""
    from leakbench.leaderboard.publish import render_boards

    records_safe = as_entry(entry("records-safe", 0.9, {"dlg": 0.0, "membership-lira": 0.9}, targets=16))
    records_leak = as_entry(entry("records-leak", 0.9, {"dlg": 0.5, "membership-lira": 0.0}, targets=16))
    assert [e.name for e in rank([records_leak, records_safe])] == ["records-safe", "records-leak"]
    assert ranked_leak(records_safe).attack == "dlg"
    fx.write_entry(tmp_path, fx.make_entry("mixed", 0.9, {"dlg": 0.5, "membership-lira": 0.09}))
    render_boards(tmp_path)
    board = (tmp_path / "README.md").read_text()
    header = next(line for line in board.splitlines() if line.startswith("| #"))
    row = next(line for line in board.splitlines() if "[mixed]" in line)
    assert "worst, membership" in header and "(membership-lira)" in row


def test_an_entry_whose_training_diverged_in_any_part_is_flagged_not_ranked():
    diverged = entry("fake", 0.95, {"dlg": 0.0}, targets=16)
    parts = [{"part": "main", "accuracy": 0.95, "baseline": 0.95, "floor": 0.475, "diverged": False},
             {"part": "inversion", "accuracy": 0.1, "baseline": 0.96, "floor": 0.48, "diverged": True}]
    diverged["flags"].update(training_diverged=True, training=parts)
    honest = as_entry(entry("honest", 0.9, {"dlg": 0.5}, targets=16))
    fake = as_entry(diverged)
    assert fake.flagged and not fake.below_floor and fake.diverged_parts == ["inversion"]
    assert [(e.name, r) for e, r in standings([fake, honest])] == [("honest", "1"), ("fake", "–")]
    assert "training diverged (inversion)" in render_markdown(fx.PROTOCOL, [fake, honest])
    # the flag must follow from the parts
    lying = copy.deepcopy(diverged)
    lying["flags"]["training_diverged"] = False
    with pytest.raises(ConfigError, match=r"flags.training_diverged is false; allowed: true, whether any of "
                                          r"flags.training diverged"):
        as_entry(lying)
    lying["flags"]["training"][1]["diverged"] = False
    with pytest.raises(ConfigError, match=r"flags.training\[1\].diverged is false; allowed: true, since its "
                                          r"accuracy 0.1 < its floor 0.48"):
        as_entry(lying)


def brute_force_front(entries: list[Entry]) -> set[str]:
    """Independent check: an entry is on the front when no other one is at least as good on both axes
    and strictly better on one."""
    out = set()
    for e in entries:
        better = [o for o in entries if o is not e and (o.accuracy, -o.worst_leak) != (e.accuracy, -e.worst_leak)
                  and o.accuracy >= e.accuracy and o.worst_leak <= e.worst_leak]
        if not better:
            out.add(e.name)
    return out


def test_pareto_front():
    board = fixture_board()
    front = pareto(board)
    assert front == {"dp-sgd-strong", "clipped-noise", "prune-light", "noise-heavy"}  # below the floor counts too
    assert front == brute_force_front(board)
    # dominated entries: each has another entry at least as accurate and at most as leaky
    for e in board:
        if e.name not in front:
            assert any(o.accuracy >= e.accuracy and o.worst_leak <= e.worst_leak for o in board if o is not e)
    # identical points do not dominate each other; on a grid of ties the rule matches brute force
    twins = [as_entry(entry(n, 0.9, {"dlg": 0.5})) for n in ("x", "y")]
    assert pareto(twins) == {"x", "y"}
    grid = [as_entry(entry(f"e{i}", acc, {"dlg": leak}))
            for i, (acc, leak) in enumerate(itertools.product((0.6, 0.8, 0.9), (0.0, 0.5, 1.0)))]
    assert pareto(grid) == brute_force_front(grid) == {"e6"}  # e6 = (0.9, 0.0) dominates the rest


def test_readme_states_the_ranking_rule_the_board_uses():
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"**Ranking.** {RANKING_RULE}" in readme


# --- Markdown --------------------------------------------------------------------------------------

def test_markdown_board_lists_ranked_entries_with_marks():
    board = fixture_board()
    text = render_markdown(fx.PROTOCOL, board)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "[" in line]
    assert [r.split("[", 1)[1].split("]", 1)[0] for r in rows] == [e.name for e in rank(board)]
    front = pareto(board)
    for row, e in zip(rows, rank(board)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (cells[1] == "★") == (e.name in front)
        assert cells[5] == f"{100 * e.accuracy:.1f}%"
        assert cells[7] == f"{100 * e.worst_leak:.1f}% ({e.worst_attack})"
        assert ("below accuracy floor" in row) == e.below_floor
    assert "Wilson 95% interval" in text and "accuracy floor of 50.0%" in text
    assert "no entries yet" in render_markdown("v1", [])


def test_markdown_escapes_submitter_strings():
    data = entry(authors="<img src=x onerror=alert(1)> | *x*", params={"note": "a|b"})
    text = render_markdown(fx.PROTOCOL, [as_entry(data)])
    table = re.sub(r"\]\(<https://[^<>\s]*>\)", "]()", text.split("|---", 1)[1])  # links' own brackets
    assert not re.search(r"(?<!\\)[<>]", table)  # every other angle bracket in the table escaped
    assert "\\<img src=x onerror=alert(1)\\> \\| \\*x\\*" in text and "note=a\\|b" in text


# --- the command -----------------------------------------------------------------------------------

def test_leaderboard_render_writes_markdown_and_html(tmp_path, capsys):
    fx.write_board(tmp_path)
    assert main(["leaderboard", "--root", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert render_markdown(fx.PROTOCOL, load_board(fx.PROTOCOL, tmp_path), html_link="v3-smoke/index.html") in readme
    assert (tmp_path / fx.PROTOCOL / "index.html").read_text().count("<tr data-name") == len(fx.BOARD)
    assert "README.md" in capsys.readouterr().out
    # no entries at all: the index says so; a named protocol gets an empty board
    empty = tmp_path / "empty"
    assert main(["leaderboard", "render", "--root", str(empty), "--protocol", "v1"]) == 0
    assert "no entries yet" in (empty / "README.md").read_text()
    assert "No entries yet." in (empty / "v1" / "index.html").read_text()


def test_leaderboard_render_with_a_bad_entry_writes_nothing(tmp_path, capsys):
    fx.write_board(tmp_path)
    bad = entry("zz-bad")
    bad["attacks"]["dlg"]["leak_rate"] = "0.25"
    path = fx.write_entry(tmp_path, bad)
    assert main(["leaderboard", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: attacks.dlg.leak_rate is \"0.25\" (a string)" in err
    assert not (tmp_path / "README.md").exists() and not (tmp_path / fx.PROTOCOL / "index.html").exists()
    assert main(["leaderboard", "render", str(path), "--root", str(tmp_path)]) == 2  # render takes no ENTRY


def test_leaderboard_verify_dispatches_to_leaderboard_verify(tmp_path, monkeypatch):
    calls = []

    def verify_entries(paths, *, root, protocol, data_dir):
        calls.append((paths, root, protocol, data_dir))
        return 3

    monkeypatch.setattr("leakbench.cli.verify_entries", verify_entries)
    monkeypatch.delenv("LEAKBENCH_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # the mirrors must be folders (a missing one is bad input)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "env-mirror").mkdir()
    code = main(["leaderboard", "verify", "a.json", "b.json", "--root", str(tmp_path), "--protocol", "v1",
                 "--data-dir", "mirror"])
    assert code == 3
    assert calls == [([Path("a.json"), Path("b.json")], tmp_path, "v1", "mirror")]
    # no ENTRY: it verifies the whole board of the (default) protocol
    monkeypatch.setenv("LEAKBENCH_DATA_DIR", "env-mirror")
    assert main(["leaderboard", "verify"]) == 3
    assert calls[-1] == ([], Path("leaderboards"), "v3-smoke", "env-mirror")


def test_every_leak_rate_has_its_targets_and_interval_and_each_harm_its_worst_case(tmp_path):
    """Leak rates are shown with the number of targets and their Wilson 95% interval; reconstruction of
    a record and class representatives (model inversion) get a worst case each, apart from the overall."""
    from scipy.stats import binomtest

    from leakbench.leaderboard.publish import render_boards

    fx.write_entry(tmp_path, fx.make_entry("mixed", 0.9, {"dlg": 0.5, "model-inversion": 1.0}))
    render_boards(tmp_path)
    board = (tmp_path / "README.md").read_text()
    row = next(line for line in board.splitlines() if "[mixed]" in line)

    def shown(rate, n):
        ci = binomtest(round(rate * n), n).proportion_ci(confidence_level=0.95, method="wilson")
        return f"{100 * rate:.1f}% of {n} [{100 * ci.low:.0f}–{100 * ci.high:.0f}%]"

    header = next(line for line in board.splitlines() if line.startswith("| #"))
    assert "worst, record reconstruction" in header and "worst, class representatives" in header
    assert f"{shown(0.5, 4)} (dlg)" in row and f"{shown(1.0, 4)} (model-inversion)" in row
    assert "100.0% (model-inversion)" in row  # the overall worst case is still the maximum over all attacks
    page = (tmp_path / fx.PROTOCOL / "index.html").read_text()
    assert "worst, record reconstruction" in page and shown(0.5, 4) in page
