"""Benchmark of torch.compile on the SepEn training step: the exact step with its map capture compiled
(FinetuneConfig(compile=True)) against the same step uncompiled, on the same fixed inputs as bench/step_bench.py,
alternating the two (ABBA) after a first compiled step whose time (compilation included) is reported apart.

  python bench/compile_bench.py --device cuda --dtype bf16 --json $OUT/compile.json    # bench/run_gpu.sh
  python bench/compile_bench.py --tiny --backend eager                               # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402  (puts the repo root on sys.path too)

from sepen_core import attention  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(step_bench.DTYPES), default="fp32")
    parser.add_argument("--resolution", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet layout")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    attention.COMPILE_BACKEND = args.backend
    dtype = step_bench.DTYPES[args.dtype]
    model = step_bench.build_model(args.tiny, args.device)
    step_bench.set_trainable(model)
    batch = step_bench.make_batch(model, 32 if args.tiny else args.resolution, batch=args.batch)
    first, _ = step_bench.timed(model, batch, "exact_compiled", dtype)  # compiles
    step_bench.timed(model, batch, "exact", dtype)  # warms the uncompiled path up
    seconds: dict[str, list[float]] = {"exact": [], "exact_compiled": []}
    losses = {}
    for i in range(args.runs):
        for method in ("exact", "exact_compiled") if i % 2 == 0 else ("exact_compiled", "exact"):
            took, losses[method] = step_bench.timed(model, batch, method, dtype)
            seconds[method].append(took)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "backend": args.backend,
        "dtype": args.dtype,
        "resolution": 32 if args.tiny else args.resolution,
        "batch": args.batch,
        "model": "tiny" if args.tiny else "SD 1.5 architecture, random weights",
        "first_compiled_step_s": first,
        "median_s": median,
        "speedup": median["exact"] / median["exact_compiled"],
        "loss_difference": abs(losses["exact"] - losses["exact_compiled"]),
        "seconds": seconds,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
