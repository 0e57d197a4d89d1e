"""A first SepEn probe on the bundled toy model (not the benchmark): finetune on the training pairs of
the finetuning nouns with content and raw maps, and compare detector success with the base model.

    python -m toyworld.probe_sepen [--steps 150] [--samples 60]
"""

from __future__ import annotations

import argparse
import json

import torch

from sepen_core.adapters import restore_base_keys
from sepen_core.config import FinetuneConfig, MapConfig
from sepen_core.finetuning import finetune
from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
from sepen_core.prompts import ConceptSet
from toyworld.evaluate import EvalConfig, evaluate
from toyworld.model import TOY_MAP_DOWNSAMPLE
from toyworld.world import load_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, world = load_base_model(BUNDLED_MODEL_DIR), load_world()
    groups = ("single", "train_pairs", "heldout_pairs")
    evaluation = EvalConfig(samples_per_group=args.samples, groups=groups)
    unseen = set(world.to_dict()["unseen_in_finetuning"])
    pairs = [tuple(p) for p in world.to_dict()["train_pairs"] if not set(p) & unseen]
    rows = {"base": {g: r["success"] for g, r in evaluate(model, world, evaluation)[0].items()}}
    for normalization in ("content", "raw"):
        config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                maps=MapConfig(map_downsample=TOY_MAP_DOWNSAMPLE, normalization=normalization))
        result = finetune(model, ConceptSet.pairs(*pairs, templates=("a {A} and a {B}",)), config)
        result.adapter.apply(model)
        try:
            success = {g: r["success"] for g, r in evaluate(model, world, evaluation)[0].items()}
        finally:
            restore_base_keys(model)
        first, last = result.history[0], result.history[-1]
        rows[f"sepen-{normalization}"] = {**success, "min_peak": [first.min_peak, last.min_peak],
                                          "overlap": [first.overlap, last.overlap]}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
