"""Where the exact path's step time goes: torch.profiler over one exact SepEn step (after a warm-up)
on the SD 1.5-architecture UNet, by op and by op family, forward vs backward.

  python bench/profile_exact.py --resolution 64 --out bench/profile-exact-cpu.txt
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402

FAMILIES = [  # (family, substrings of the op name), first match wins
    ("attention (SDPA fwd/bwd)", ("scaled_dot_product", "flash_attention")),
    ("explicit attention (capture layers: baddbmm/bmm/softmax)", ("baddbmm", "bmm", "softmax")),
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("linear / matmul", ("addmm", "aten::mm", "matmul", "linear")),
    ("group norm", ("group_norm",)),
    ("layer norm", ("layer_norm",)),
    ("activations (silu/gelu)", ("silu", "gelu")),
    (
        "elementwise add/mul/copy/cat",
        ("aten::add", "aten::mul", "aten::copy_", "aten::cat", "aten::div", "aten::clone", "aten::fill_", "aten::zero"),
    ),
]


def family(name: str) -> str:
    lowered = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in lowered for k in keys):
            return fam
    return "other"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--method", default="exact", choices=step_bench.ALL_METHODS)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    model = step_bench.build_model(args.tiny, "cpu")
    step_bench.set_trainable(model)
    batch = step_bench.make_batch(model, args.resolution)
    step_bench.run_method(model, batch, args.method)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_bench.run_method(model, batch, args.method)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)

    by_family: dict[str, float] = defaultdict(float)
    backward_us = 0.0
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
    # the autograd engine wraps each backward node in "autograd::engine::evaluate_function: ...";
    # their total is the backward
    backward_us = sum(e.cpu_time_total for e in events if e.key.startswith("autograd::engine::evaluate_function:"))

    lines = [
        f"one {args.method} step at {args.resolution}x{args.resolution}, "
        f"{'tiny' if args.tiny else 'SD 1.5'} UNet, fp32, CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}",
        f"total self CPU time {total_us / 1e6:.3f} s: backward (autograd engine nodes) {backward_us / 1e6:.3f} s, "
        f"forward and the rest {(total_us - backward_us) / 1e6:.3f} s",
        "",
        "self CPU time by op family:",
    ]
    for fam, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {fam:<58} {us / 1e6:7.3f} s  {us / total_us * 100:5.1f}%")
    lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
