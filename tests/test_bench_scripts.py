"""The benchmark scripts run (small settings) and check what they measure: bench/batch_bench.py's three modes on the
toy model, with the mixed batch's images equal to the one-at-a-time images; bench/attend_excite_cost.py's ratio and
counted gradient evaluations within A&E's schedule."""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """A script of bench/ imported as a module."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_batch_bench_on_the_toy_model(tmp_path):
    batch_bench = bench_module("batch_bench")
    out = tmp_path / "batch.json"
    report = batch_bench.main(["--models", "toy", "--runs", "1", "--steps", "2", "--jobs", "4", "--json", str(out)])
    (row,) = report["models"]
    assert set(row["median_s"]) == {"mixed", "shared", "sequential"} and row["jobs"] == 4
    assert row["max_pixel_difference_mixed_vs_alone"] < 1e-4
    assert row["max_pixel_difference_mixed_vs_shared"] > 0  # different adapters: different images
    assert out.read_text().startswith("{")


def test_attend_excite_cost_on_the_toy_model(tmp_path):
    attend_excite_cost = bench_module("attend_excite_cost")
    from sepen_core.config import attend_excite_evaluations, guidance_cost

    out = tmp_path / "cost.json"
    report = attend_excite_cost.main(["--models", "toy", "--runs", "2", "--steps", "4", "--json", str(out)])
    (row,) = report["models"]
    assert row["runs"] == 2 and len(row["plain_s"]) == len(row["attend_excite_s"]) == 2
    assert all(2 <= k <= attend_excite_evaluations(4) for k in row["gradient_evaluations"])
    assert row["median_ratio"] > 1 and row["served_relative_cost"] == guidance_cost("attend-excite", 4)
    assert "--models toy --runs 2" in report["command"] and out.read_text().startswith("{")
