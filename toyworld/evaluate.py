"""Object success of a toy model: sample prompts group by group with sepen_core.sampling.generate and count detections.

Groups: "single" (every noun), "train_pairs" and "heldout_pairs" (both caption orders of each
pair), and the held-out pairs split like the paper's test groups by unseen_in_finetuning nouns:
"heldout_seen_seen", "heldout_seen_unseen", "heldout_unseen_unseen". World v2 adds its pair roles:
"validation" (the only pairs that choose anything) and "test_seen_seen", "test_seen_unseen",
"test_unseen_unseen" (the final table's). A group's samples are spread as evenly as possible over
its prompts; prompt j's images use seeds seed + 1000 * j + i, so two models evaluated with the same
config see the same noise (paired comparisons). Pair groups also report why images failed
(toyworld.failures) and, per denoising step, whether the maps predicted it (toyworld.premise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sepen_core.models import BaseModel, load_base_model
from sepen_core.sampling import generate
from sepen_core.stats import wilson_interval  # noqa: F401 - re-exported
from toyworld.detector import detections, exact_success, find_candidates, object_success
from toyworld.failures import count_kinds, failure_kinds
from toyworld.premise import PairSample, early_summary, step_aucs
from toyworld.world import World, caption, load_world

HELDOUT_GROUPS = {
    "heldout_pairs": (0, 1, 2),
    "heldout_seen_seen": (0,),
    "heldout_seen_unseen": (1,),
    "heldout_unseen_unseen": (2,),
}
TEST_GROUPS = {"test_seen_seen": 0, "test_seen_unseen": 1, "test_unseen_unseen": 2}  # unseen nouns in the pair
GROUPS = ("single", "train_pairs", *HELDOUT_GROUPS, "validation", *TEST_GROUPS)


@dataclass(frozen=True)
class EvalConfig:
    samples_per_group: int = 100
    num_inference_steps: int = 20
    # 1.0: no classifier-free guidance. The first 4k-step CPU model follows prompts at 1.0 (96% single
    # objects) and breaks at 2-3 (35% and 7-10%): re-check with `--guidance` for every new base model.
    guidance_scale: float = 1.0
    seed: int = 1_000_000
    groups: tuple[str, ...] = ("single", "train_pairs", "heldout_pairs")
    # Which attn2 layers' maps the premise reads (MapConfig.map_downsample); None: the model's own, the layers
    # its SepEn recipe trains on (2 for the toy model: 16x16). Runs before this option read 4 (8x8 maps).
    map_downsample: int | None = None

    def __post_init__(self):
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"EvalConfig: unknown group {unknown[0]!r}; choose from {GROUPS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def group_prompts(world: World, group: str) -> list[tuple[str, ...]]:
    """The noun tuples (caption order) a group samples."""
    if group == "single":
        return [(n,) for n in world.nouns]
    unseen = set(world.unseen_in_finetuning)
    if group == "train_pairs":
        pairs = list(world.train_pairs)
    elif group == "validation":
        pairs = list(world.validation_pairs)
    elif group in TEST_GROUPS:
        pairs = [p for p in world.test_pairs if sum(n in unseen for n in p) == TEST_GROUPS[group]]
    else:
        pairs = [p for p in world.heldout_pairs if sum(n in unseen for n in p) in HELDOUT_GROUPS[group]]
    if not pairs:
        raise ValueError(f"world has no {group} pairs (world v1 has no validation or test roles)")
    return [order for a, b in pairs for order in ((a, b), (b, a))]


def spread(n: int, prompts: int) -> list[int]:
    """How many of n samples each of `prompts` prompts gets: as even as possible, the first ones one more."""
    return [len(range(j, n, prompts)) for j in range(prompts)]


def evaluate(
    model: BaseModel, world: World, config: EvalConfig | None = None
) -> tuple[dict, dict[str, list[Image.Image]]]:
    """-> ({group: numbers}, {group: the first image of each prompt, for a preview})."""
    config = config or EvalConfig()
    results, previews = {}, {}
    for group in config.groups:
        results[group], previews[group] = evaluate_group(model, world, config, group_prompts(world, group))
    return results, previews


def evaluate_group(
    model: BaseModel, world: World, config: EvalConfig, prompts: list[tuple[str, ...]]
) -> tuple[dict, list[Image.Image]]:
    """One group's numbers and previews; pair prompts are sampled with their maps recorded (for the premise)."""
    counts = spread(config.samples_per_group, len(prompts))
    success = exact = colour_only = 0
    per_noun: dict[str, list[int]] = {}
    failures, pair_samples, previews = [], [], []
    for j, (nouns, count) in enumerate(zip(prompts, counts, strict=True)):
        if count == 0:
            continue
        given = {
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "num_images": count,
            "seed": config.seed + 1000 * j,
        }
        if config.map_downsample is not None:
            given["maps"] = {"map_downsample": config.map_downsample}
        sample = model.defaults.sample_config(given)
        result = generate(model, caption(nouns), sample, concepts=list(nouns) if len(nouns) > 1 else None)
        previews.append(result.images[0])
        for i, pixels in enumerate(result.pixels):
            candidates = find_candidates(world, pixels)  # once per image: detections, colours, failure kinds
            detected = detections(candidates)
            ok = object_success(detected, nouns)
            success += ok
            exact += exact_success(detected, nouns)
            colour_only += set(nouns) <= {n for c in candidates for n in c.colour_nouns}
            for noun in nouns:
                per_noun.setdefault(noun, []).append(int(noun in detected))
            if len(nouns) > 1:
                failures.append(failure_kinds(candidates, nouns))
                step_peaks = [step[i].peaks for step in result.step_scores]
                pair_samples.append(PairSample(tuple(nouns), frozenset(detected), step_peaks))
    n = sum(counts)
    low, high = wilson_interval(success, n)
    numbers = {
        "n": n,
        "success": success / n,
        "success_ci95": [low, high],
        "exact": exact / n,
        "colour_only": colour_only / n,
        "per_noun_detected": {k: sum(v) / len(v) for k, v in sorted(per_noun.items())},
    }
    if pair_samples:
        steps = step_aucs(pair_samples)
        numbers.update(failure_kinds=count_kinds(failures), premise_early=early_summary(steps), premise_steps=steps)
    return numbers, previews


def preview_grid(previews: dict[str, list[Image.Image]], columns: int = 16, scale: int = 2) -> Image.Image:
    """One row per group (its first `columns` prompts), upscaled with nearest neighbour."""
    side = next(iter(next(iter(previews.values())))).width * scale
    grid = Image.new("RGB", (columns * (side + 2), len(previews) * (side + 2)), (40, 40, 40))
    for r, images in enumerate(previews.values()):
        for c, image in enumerate(images[:columns]):
            grid.paste(image.resize((side, side), Image.NEAREST), (c * (side + 2), r * (side + 2)))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Object success of a toy model (detector-based).")
    parser.add_argument("--model", required=True, help="a directory written by BaseModel.save_pretrained")
    parser.add_argument("--out", required=True, help="JSON file for the numbers (a preview PNG is written beside it)")
    parser.add_argument("--samples", type=int, default=EvalConfig.samples_per_group)
    parser.add_argument("--steps", type=int, default=EvalConfig.num_inference_steps)
    parser.add_argument("--guidance", type=float, default=EvalConfig.guidance_scale)
    parser.add_argument("--seed", type=int, default=EvalConfig.seed)
    parser.add_argument("--groups", nargs="+", default=list(EvalConfig.groups), choices=GROUPS)
    parser.add_argument(
        "--map-downsample", type=int, help="the maps the premise reads (default: the model's own, its SepEn layers)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the seeds' noise is drawn on the CPU either way)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    world = load_world(model_dir / "world.json") if (model_dir / "world.json").exists() else load_world()
    config = EvalConfig(args.samples, args.steps, args.guidance, args.seed, tuple(args.groups), args.map_downsample)
    results, previews = evaluate(load_base_model(model_dir).to(args.device), world, config)
    out = Path(args.out)
    out.write_text(
        json.dumps({"model": str(model_dir), "config": config.to_dict(), "results": results}, indent=2) + "\n"
    )
    preview_grid(previews).save(out.with_suffix(".png"))
    for group, numbers in results.items():
        line = f"{group}: success {numbers['success']:.3f} (n={numbers['n']}), exact {numbers['exact']:.3f}"
        if "failure_kinds" in numbers:
            early = {k: None if v is None else round(v, 3) for k, v in numbers["premise_early"].items()}
            line += f"; missing objects by kind {numbers['failure_kinds']}; early-step AUCs {early}"
        print(line)


if __name__ == "__main__":
    main()
