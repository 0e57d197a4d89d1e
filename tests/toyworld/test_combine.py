"""toyworld.combine: benchmark runs on the same items become one table with seed means; runs on other items are
refused. And the statistic behind the seed means (sepen_core.stats.paired_mean_difference)."""

import json
import math

import pytest

from sepen_core.stats import paired_mean_difference
from toyworld.combine import CombineError, combine, main, markdown

BASE = "1100110011"  # 10 items, 6 successes


def method_row(label: str, outcomes: dict[str, str]) -> dict:
    summary = {g: {"success": o.count("1") / len(o), "success_ci95": [0.0, 1.0]} for g, o in outcomes.items()}
    vs_base = {g: {"difference": 0.0, "ci95": [0.0, 0.0], "p_mcnemar": 1.0} for g in outcomes}
    return {"label": label, "outcomes": outcomes, "summary": summary, "vs_base": vs_base}


def report(methods: dict[str, dict], groups=("test_seen_seen",), items: int = 10) -> dict:
    return {
        "model": "sepen-toy",
        "config": {"items_per_group": items, "seed": 3_000_000},
        "groups": list(groups),
        "methods": {"base": method_row("base model", {g: BASE for g in groups}), **methods},
    }


def test_seed_runs_in_separate_reports_combine_into_a_seed_mean():
    runs = [
        report({"sepen-per-pair-s0": method_row("SepEn, per pair (seed 0)", {"test_seen_seen": "1111110011"})}),
        report({"sepen-per-pair-s1": method_row("SepEn, per pair (seed 1)", {"test_seen_seen": "1100111111"})}),
        report({"attend-excite": method_row("Attend-and-Excite", {"test_seen_seen": "1111111111"})}),
    ]
    combined = combine(runs, ["a", "b", "c"])
    assert list(combined["methods"]) == ["base", "sepen-per-pair-s0", "sepen-per-pair-s1", "attend-excite"]
    mean = combined["seed_means"]["sepen-per-pair"]
    assert mean["label"] == "SepEn, per pair: mean of 2 seeds" and mean["methods"] == [
        "sepen-per-pair-s0",
        "sepen-per-pair-s1",
    ]
    d = mean["groups"]["test_seen_seen"]
    assert d["success"] == pytest.approx(0.8) and d["difference"] == pytest.approx(0.2)
    assert d["by_run"] == pytest.approx([0.2, 0.2]) and d["runs"] == 2
    text = markdown(combined)
    assert "SepEn, per pair: mean of 2 seeds | 80.0: +20.0" in text and "`a`, `b`, `c`" in text


def test_groups_a_run_did_not_sample_are_not_run_in_the_table():
    full = report({}, groups=("single", "test_seen_seen"))
    per_pair = report({"sepen-per-pair-s0": method_row("per pair", {"test_seen_seen": BASE})})
    text = markdown(combine([full, per_pair], ["full", "per-pair"]))
    assert "| per pair | not run | 60.0 [0.0, 100.0] |" in text


def test_runs_on_other_items_are_refused():
    other_base = report({})
    other_base["methods"]["base"]["outcomes"]["test_seen_seen"] = "0011001100"
    with pytest.raises(CombineError, match="base model's outcomes on test_seen_seen differ"):
        combine([report({}), other_base], ["a", "b"])
    with pytest.raises(CombineError, match="items_per_group 20, not 10"):
        combine([report({}), report({}, items=20)], ["a", "b"])
    twice = report({"attend-excite": method_row("A&E", {"test_seen_seen": BASE})})
    with pytest.raises(CombineError, match="attend-excite is also in a"):
        combine([twice, twice], ["a", "b"])


def test_the_command_writes_the_combined_table(tmp_path):
    for name, methods in (("a", {}), ("b", {"attend-excite": method_row("A&E", {"test_seen_seen": "1111111111"})})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(report(methods)))
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert "A&E" in (tmp_path / "out" / "combined.md").read_text()
    assert set(json.loads((tmp_path / "out" / "combined.json").read_text())["methods"]) == {"base", "attend-excite"}


def test_paired_mean_difference_averages_each_item_over_the_runs():
    base = [True, False, False, True]
    d = paired_mean_difference(base, [[True, True, False, True], [True, True, True, True]])
    per_item = [0.0, 1.0, 0.5, 0.0]
    mean = sum(per_item) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in per_item) / 3 / 4)
    assert d["difference"] == pytest.approx(mean) and d["ci95"] == pytest.approx([mean - 1.96 * se, mean + 1.96 * se])
    assert d["p"] == pytest.approx(math.erfc(mean / se / math.sqrt(2))) and d["by_run"] == pytest.approx([0.25, 0.5])
    assert paired_mean_difference(base, [base, base])["p"] == 1.0
    with pytest.raises(ValueError):
        paired_mean_difference(base, [])


def test_a_tagged_run_sits_beside_a_run_of_the_same_methods_and_pairs_are_reported():
    from toyworld.combine import tagged

    prompts = {"test_seen_seen": ["a / b", "b / a"]}  # 10 items: 5 per caption order, one pair
    old = {**report({"attend-excite": method_row("Attend-and-Excite", {"test_seen_seen": "1111111111"})})}
    new = report(
        {
            "attend-excite": method_row("Attend-and-Excite", {"test_seen_seen": "0000000000"}),
            "sepen-per-pair-s0": method_row("SepEn, per pair (seed 0)", {"test_seen_seen": "1100110011"}),
        }
    )
    with pytest.raises(CombineError, match="attend-excite"):
        combine([old, new], ["old", "new"])
    combined = combine([{**old, "prompts": prompts}, {**tagged(new, "ref"), "prompts": prompts}], ["old", "new"])
    assert list(combined["methods"]) == ["base", "attend-excite", "attend-excite-ref", "sepen-per-pair-ref-s0"]
    assert combined["methods"]["attend-excite-ref"]["label"] == "Attend-and-Excite [ref]"
    pairs = combined["methods"]["attend-excite-ref"]["per_pair"]["test_seen_seen"]
    assert pairs["worst"] == "a + b" and pairs["pairs"]["a + b"]["difference"] == pytest.approx(-0.6)
    assert "worst a + b -60.0 (n 10)" in markdown(combined)


def test_a_method_run_in_parts_on_other_groups_is_one_row():
    groups = ("test_seen_seen", "test_unseen_unseen")
    first = report({"sepen-per-pair-s0": method_row("SepEn", {"test_seen_seen": "1111110011"})}, groups=groups[:1])
    second = report({"sepen-per-pair-s0": method_row("SepEn", {"test_unseen_unseen": "0000000000"})}, groups=groups[1:])
    combined = combine([first, second], ["a", "b"])
    row = combined["methods"]["sepen-per-pair-s0"]
    assert row["outcomes"] == {"test_seen_seen": "1111110011", "test_unseen_unseen": "0000000000"}
    assert set(row["summary"]) == set(groups) and row["source"] == "a + b" and combined["groups"] == list(groups)
