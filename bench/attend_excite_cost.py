"""What Attend-and-Excite costs per image against plain sampling, per model: the number GET /models states.

For each model it samples one image of a two-object prompt per run (the toy model: its test pairs, spread over the
runs) with the model's default settings, plain and with A&E (the published schedule, sepen_core.attend_excite), side
by side and alternating (plain, A&E, plain, A&E ...: a machine whose load drifts slows both alike), on one thread,
and reports the median of the runs' A&E/plain ratios.
It also counts A&E's gradient evaluations (forward to the last map layer and backward) and derives what one costs in
plain denoising steps, the measured counterpart of sepen_core.config.AE_UPDATE_COST, which bounds it; and the bound
that GET /models serves (sepen_core.config.guidance_cost) beside the measured ratio.

  OMP_NUM_THREADS=1 python bench/attend_excite_cost.py --models toy --runs 20 --json bench/results-ae-cost-toy-cpu.json
  OMP_NUM_THREADS=1 python bench/attend_excite_cost.py --models tiny --runs 7 --json bench/results-ae-cost-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sepen_core import attend_excite as ae
from sepen_core import sampling
from sepen_core.config import AE_UPDATE_COST, guidance_cost
from sepen_core.models import load_model

TOY_WORLD = Path(__file__).resolve().parents[1] / "sepen_core" / "bundled" / "sepen-toy" / "world.json"


def prompts(spec: str) -> list[tuple[str, list[str]]]:
    """The prompts run r samples (the r-th, cycling): the toy model's test pairs (A&E refines where an object is
    weak, so its cost varies with the pair), the tiny random model's one prompt (its maps never pass A&E's thresholds:
    every refinement runs to its limit)."""
    if spec == "tiny":
        return [("a cat and a dog", ["cat", "dog"])]
    pairs = json.loads(TOY_WORLD.read_text())["test_pairs"]
    return [(f"a {a} and a {b}", [a, b]) for a, b in pairs]


class CountingAttendExcite(ae.AttendExcite):
    """AttendExcite that counts its gradient evaluations (each a forward to the last map layer and its backward)."""

    evaluations = 0

    def _loss_gradient(self, latents, t, rows=None):
        CountingAttendExcite.evaluations += 1
        return super()._loss_gradient(latents, t, rows)


def measure(spec: str, runs: int, steps: int | None) -> dict:
    model = load_model(spec)
    cycle = prompts(spec)
    prompt, concepts = cycle[0]
    config = model.defaults.sample_config({} if steps is None else {"num_inference_steps": steps})
    sampling.generate(model, prompt, config, concepts=concepts)  # warm-up, not timed
    plain, excited, evaluations = [], [], []
    for run in range(runs):
        prompt, concepts = cycle[run * len(cycle) // runs] if runs <= len(cycle) else cycle[run % len(cycle)]
        start = time.perf_counter()
        sampling.generate(model, prompt, replace(config, seed=run), concepts=concepts)
        plain.append(time.perf_counter() - start)
        CountingAttendExcite.evaluations = 0
        start = time.perf_counter()
        sampling.generate(model, prompt, replace(config, seed=run, guidance_method="attend-excite"), concepts=concepts)
        excited.append(time.perf_counter() - start)
        evaluations.append(CountingAttendExcite.evaluations)
    n = config.num_inference_steps
    ratios = [e / p for e, p in zip(excited, plain, strict=True)]
    # One gradient evaluation in plain denoising steps: the extra time over the evaluations, per plain step's time.
    per_evaluation = [(e - p) / k / (p / n) for e, p, k in zip(excited, plain, evaluations, strict=True) if k]
    return {
        "model": spec,
        "prompts": sorted({p for p, _ in cycle})
        if runs >= len(cycle)
        else [cycle[r * len(cycle) // runs][0] for r in range(runs)],
        "steps": n,
        "guidance_scale": config.guidance_scale,
        "runs": runs,
        "plain_s": plain,
        "attend_excite_s": excited,
        "gradient_evaluations": evaluations,
        "median_plain_s": statistics.median(plain),
        "median_attend_excite_s": statistics.median(excited),
        "median_ratio": statistics.median(ratios),
        "max_ratio": max(ratios),
        "median_evaluation_cost_in_steps": statistics.median(per_evaluation) if per_evaluation else None,
        "update_cost_bound": AE_UPDATE_COST,
        "served_relative_cost": guidance_cost("attend-excite", n),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "tiny"], choices=["toy", "tiny"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, help="sampling steps (default: each model's own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sampling.AttendExcite = CountingAttendExcite  # generate_batch builds its AttendExcite by this name
    try:
        rows = [measure(spec, args.runs, args.steps) for spec in args.models]
    finally:
        sampling.AttendExcite = ae.AttendExcite
    report = {
        "command": " ".join(
            ["OMP_NUM_THREADS=1 python bench/attend_excite_cost.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "models": rows,
    }
    for row in report["models"]:
        print(
            f"{row['model']}: {row['steps']} steps, plain {row['median_plain_s']:.3f} s, A&E "
            f"{row['median_attend_excite_s']:.3f} s, ratio median {row['median_ratio']:.2f} "
            f"(max {row['max_ratio']:.2f}), "
            f"gradient evaluations {row['gradient_evaluations']}, one = {row['median_evaluation_cost_in_steps']:.2f} "
            f"plain steps; served bound {row['served_relative_cost']:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
