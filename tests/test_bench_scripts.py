"""The benchmark scripts run (small settings) and check what they measure: bench/batch_bench.py's three modes on the
toy model, with the mixed batch's images equal to the one-at-a-time images."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_batch_bench_on_the_toy_model(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import batch_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "batch.json"
    report = batch_bench.main(["--models", "toy", "--runs", "1", "--steps", "2", "--jobs", "4", "--json", str(out)])
    (row,) = report["models"]
    assert set(row["median_s"]) == {"mixed", "shared", "sequential"} and row["jobs"] == 4
    assert row["max_pixel_difference_mixed_vs_alone"] < 1e-4
    assert row["max_pixel_difference_mixed_vs_shared"] > 0  # different adapters: different images
    assert out.read_text().startswith("{")
