"""Time the exact SepEn step and the capture forward of one checkout of this repository (run it alternately for two
checkouts to compare them side by side): SD 1.5 architecture, random weights, bench/step_bench.py's fixed inputs.

  git worktree add /tmp/before <commit>
  for repo in /tmp/before . /tmp/before .; do OMP_NUM_THREADS=1 python bench/ab_step.py $repo; done
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="the checkout whose sepen_core to time")
    parser.add_argument("--resolution", type=int, default=32, help="latent side")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo / "bench"))
    import step_bench  # that checkout's, which puts its root first on sys.path
    import torch

    import sepen_core

    if not sepen_core.__file__.startswith(str(repo)):
        raise SystemExit(
            f"imported {sepen_core.__file__}, not {repo}'s sepen_core: run from outside a venv's editable path"
        )
    torch.set_num_threads(1)
    model = step_bench.build_model(False, "cpu")
    step_bench.set_trainable(model)
    batch = step_bench.make_batch(model, args.resolution)
    medians = {}
    for method in ("exact", "floor"):
        step_bench.timed(model, batch, method, None)  # warm-up
        medians[method] = statistics.median(step_bench.timed(model, batch, method, None)[0] for _ in range(args.runs))
    print(repo, {k: round(v, 3) for k, v in medians.items()})
    return medians


if __name__ == "__main__":
    main()
