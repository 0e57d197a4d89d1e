"""The toy-world benchmark: base model vs SepEn (training pairs, large-scale) vs Attend-and-Excite, with paired
seeds, 95% confidence intervals, per-image cost and image grids.

    python -m toyworld.benchmark --out docs/toyworld-benchmark            # full: 200 items per group, 2 finetune seeds
    python -m toyworld.benchmark --out /tmp/bench --quick                 # 4 items per group, 2 finetune steps (CI)

Groups (the split is in toyworld/README.md):
  single          every noun alone
  seen_pairs      the 27 training pairs of the 9 finetuning nouns: what "SepEn on training pairs" finetunes on
  heldout_seen_seen  the 9 held-out pairs of finetuning nouns: never together in base training nor in SepEn's pairs
                     (the same group as toyworld.evaluate's; results.json of runs before it was renamed say
                     "heldout_pairs")
  unseen_concept  the 12 held-out pairs with a noun SepEn never sees (candle, flag, wedge)
Both caption orders of each pair are prompts. Every method samples the same items from the same noise
(item i of prompt j of group g starts from seed + 100000 g + 1000 j + i), so differences are paired:
the table gives each method's success with a Wilson interval, and its paired difference from the base
model with a 95% interval and McNemar's exact test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExciteConfig
from sepen_core.finetuning import finetune
from sepen_core.models import BUNDLED_MODEL_DIR, BaseModel, load_base_model
from sepen_core.prompts import ConceptSet
from sepen_core.sampling import generate
from toyworld.detector import detect, exact_success, object_success
from toyworld.evaluate import group_prompts, spread, wilson_interval
from toyworld.world import World, caption, load_world

GROUPS = ("single", "seen_pairs", "heldout_seen_seen", "unseen_concept")
# The world's caption forms: SepEn finetunes on prompts worded as the benchmark samples them.
TEMPLATE, PRIOR_TEMPLATE = "a {A} and a {B}", "a {A}"
GRID_METHODS = ("base", "sepen-pairs-s0", "sepen-large-s0", "attend-excite")
TIMING_PROMPT = ("cherry", "box")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "base", "sepen" or "attend_excite"
    concepts: str = ""  # sepen: "pairs" (the seen pairs) or "large_scale" (random pairs of the finetuning nouns)
    seed: int = 0
    recipe: dict = field(default_factory=dict)  # overrides of the model's own recipe (ModelDefaults)
    label: str = ""


@dataclass(frozen=True)
class BenchmarkConfig:
    items_per_group: int = 200
    finetune_seeds: tuple[int, ...] = (0, 1)
    finetune_steps: int | None = None  # None: the model's recipe
    ablations: bool = True  # content maps and each loss alone, on SepEn pairs with the first finetune seed
    seed: int = 3_000_000
    timing_repeats: int = 5
    timing_images: int = 8
    grid_columns: int = 8
    only_methods: tuple[str, ...] = ()  # run these besides the base model (default: all)
    groups: tuple[str, ...] = GROUPS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def methods(config: BenchmarkConfig) -> list[Method]:
    steps = {} if config.finetune_steps is None else {"steps": config.finetune_steps}
    rows = [Method("base", "base", label="base model")]
    for s in config.finetune_seeds:
        rows.append(Method(f"sepen-pairs-s{s}", "sepen", "pairs", s, dict(steps), f"SepEn, training pairs (seed {s})"))
    for s in config.finetune_seeds:
        rows.append(
            Method(f"sepen-large-s{s}", "sepen", "large_scale", s, dict(steps), f"SepEn, large-scale (seed {s})")
        )
    rows.append(Method("attend-excite", "attend_excite", label="Attend-and-Excite"))
    if config.ablations:
        s = config.finetune_seeds[0]
        rows += [
            Method(
                "sepen-pairs-content",
                "sepen",
                "pairs",
                s,
                {**steps, "maps": {"normalization": "content"}},
                f"SepEn pairs, content maps (seed {s})",
            ),
            Method(
                "sepen-pairs-separate-only",
                "sepen",
                "pairs",
                s,
                {**steps, "lambda_en": 0.0},
                f"SepEn pairs, Separate only (seed {s})",
            ),
            Method(
                "sepen-pairs-enhance-only",
                "sepen",
                "pairs",
                s,
                {**steps, "lambda_sep": 0.0},
                f"SepEn pairs, Enhance only (seed {s})",
            ),
        ]
    unknown = sorted(set(config.only_methods) - {m.name for m in rows})
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {[m.name for m in rows]}")
    return [m for m in rows if m.name == "base" or not config.only_methods or m.name in config.only_methods]


# ---- the world's groups and items ---------------------------------------------------------------


def group_pairs(world: World, group: str) -> list[tuple[str, ...]]:
    """The noun tuples (both caption orders) a group samples, from the evaluation's groups."""
    if group == "seen_pairs":
        unseen = set(world.unseen_in_finetuning)
        return [p for p in group_prompts(world, "train_pairs") if not set(p) & unseen]
    if group == "unseen_concept":
        return group_prompts(world, "heldout_seen_unseen") + group_prompts(world, "heldout_unseen_unseen")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose from {GROUPS}")
    return group_prompts(world, group)  # "single", "heldout_seen_seen": the evaluation's own groups


def group_items(world: World, group: str, n: int, seed: int) -> list[tuple[tuple[str, ...], list[int]]]:
    """n items spread as evenly as possible over the group's prompts: [(nouns, seeds)], paired across methods."""
    prompts = group_pairs(world, group)
    g = GROUPS.index(group)
    return [
        (nouns, [seed + 100_000 * g + 1000 * j + i for i in range(count)])
        for j, (nouns, count) in enumerate(zip(prompts, spread(n, len(prompts)), strict=True))
        if count
    ]


def sepen_concepts(world: World, kind: str) -> ConceptSet:
    if kind == "pairs":
        return ConceptSet(
            groups=tuple(group_pairs(world, "seen_pairs")[::2]), templates=(TEMPLATE,), prior_template=PRIOR_TEMPLATE
        )
    # Large-scale: every step pairs two of the finetuning nouns at random (the held-out pairs of seen nouns
    # included, as in the paper); the unseen nouns are the collection's held-out concepts.
    return ConceptSet(
        collection=world.nouns,
        held_out=tuple(world.unseen_in_finetuning),
        templates=(TEMPLATE,),
        prior_template=PRIOR_TEMPLATE,
    )


# ---- running the methods -----------------------------------------------------------------------


def sample_items(
    model: BaseModel, nouns: tuple[str, ...], seeds: list[int], adapter, excite: AttendExciteConfig | None
):
    """One prompt's images on consecutive seeds (paired across methods), with its objects' maps recorded."""
    config = model.defaults.sample_config(
        {"num_images": len(seeds), "seed": seeds[0], "maps": {"normalization": "raw"}}
    )
    assert seeds == [seeds[0] + i for i in range(len(seeds))]
    return generate(model, caption(nouns), config, adapter=adapter, concepts=list(nouns), attend_excite=excite)


def run_method(
    model: BaseModel, world: World, method: Method, items: dict, config: BenchmarkConfig
) -> tuple[dict, dict, KeyProjectionAdapter | None]:
    """-> (numbers, {group: preview images}, the SepEn adapter or None). Per item: success, exact, the weakest
    raw peak and the IoU while sampling."""
    adapter, numbers = None, {}
    if method.kind == "sepen":
        concepts = sepen_concepts(world, method.concepts)
        recipe = model.defaults.finetune_config(concepts.mode, {**method.recipe, "seed": method.seed})
        start = time.perf_counter()
        result = finetune(model, concepts, recipe, adapter_metadata={"name": method.name})
        adapter = result.adapter
        # Each step sees other prompts and timesteps: compare the means of the first and last tenth of the run.
        window = max(1, len(result.history) // 10)
        first, last = result.history[:window], result.history[-window:]
        numbers["finetune"] = {
            "seconds": time.perf_counter() - start,
            "recipe": recipe.to_dict(),
            "window": window,
            **{
                key: [statistics.fmean(getattr(r, key) for r in part) for part in (first, last)]
                for key in ("min_peak", "overlap", "loss")
            },
        }
    excite = AttendExciteConfig() if method.kind == "attend_excite" else None
    previews: dict[str, list[Image.Image]] = {}
    numbers["groups"] = {}
    for group, group_items_ in items.items():
        records = []
        previews[group] = []
        for nouns, seeds in group_items_:
            result = sample_items(model, nouns, seeds, adapter, excite)
            if len(previews[group]) < config.grid_columns:
                previews[group].append(result.images[0])
            for pixels, scores in zip(result.pixels, result.scores, strict=True):
                detected = detect(world, pixels)
                missing = [n for n in set(nouns) if n not in detected]
                records.append(
                    {
                        "success": object_success(detected, nouns),
                        "exact": exact_success(detected, nouns),
                        "found": len(set(nouns)) - len(missing),
                        "named": len(set(nouns)),
                        "missing_unseen": sum(n in world.unseen_in_finetuning for n in missing),
                        "missing_seen": sum(n not in world.unseen_in_finetuning for n in missing),
                        "min_peak": scores.min_peak,
                        "iou": scores.overlap,
                    }
                )
        numbers["groups"][group] = records
    return numbers, previews, adapter


def time_per_image(model: BaseModel, adapters: dict[str, KeyProjectionAdapter], config: BenchmarkConfig) -> dict:
    """Median seconds per image of base, SepEn and A&E sampling, measured side by side in rotating order."""
    kinds = {
        "base": (None, None),
        **{name: (a, None) for name, a in adapters.items()},
        "attend-excite": (None, AttendExciteConfig()),
    }
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    sample = model.defaults.sample_config({"num_images": config.timing_images, "seed": 0})
    for repeat in range(config.timing_repeats + 1):  # the first round warms up and is dropped
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            adapter, excite = kinds[name]
            start = time.perf_counter()
            generate(
                model,
                caption(TIMING_PROMPT),
                sample,
                adapter=adapter,
                attend_excite=excite,
                concepts=list(TIMING_PROMPT) if excite is not None else None,
            )
            if repeat:
                seconds[name].append((time.perf_counter() - start) / config.timing_images)
    base = statistics.median(seconds["base"])
    return {
        name: {"seconds_per_image": statistics.median(v), "ratio_to_base": statistics.median(v) / base}
        for name, v in seconds.items()
    }


# ---- statistics --------------------------------------------------------------------------------


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs."""
    m, k = gained + lost, min(gained, lost)
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def paired_difference(base: list[bool], other: list[bool]) -> dict:
    """other - base on the same items: the difference, its 95% interval (Wald, paired) and McNemar's p."""
    n = len(base)
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    diff = (gained - lost) / n
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return {
        "difference": diff,
        "ci95": [diff - 1.96 * se, diff + 1.96 * se],
        "gained": gained,
        "lost": lost,
        "p_mcnemar": mcnemar_p(gained, lost),
    }


def summarise(records: list[dict]) -> dict:
    n = len(records)
    success = sum(r["success"] for r in records)
    ious = [r["iou"] for r in records if r["iou"] is not None]
    failures = [r for r in records if not r["success"]]
    return {
        "n": n,
        "success": success / n,
        "success_ci95": list(wilson_interval(success, n)),
        "exact": sum(r["exact"] for r in records) / n,
        "min_peak": statistics.fmean(r["min_peak"] for r in records),
        "iou": statistics.fmean(ious) if ious else None,
        # Of the failures: how many named objects were still drawn (0 = none, 1 = one of a pair missing).
        "failures_by_found": {str(k): sum(r["found"] == k for r in failures) for k in range(3)},
        # Missing objects by kind: nouns used in SepEn finetuning, and nouns it never saw.
        "missing": {kind: sum(r[f"missing_{kind}"] for r in records) for kind in ("seen", "unseen")},
    }


# ---- report ------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    rows = report["methods"]
    groups = report["groups"]
    head = "| method | " + " | ".join(groups) + " |\n|---|" + "---:|" * len(groups) + "\n"
    out = ["### Success (% of items, 95% Wilson interval)\n", head]
    for r in rows.values():
        cells = [
            f"{_pct(s['success'])} [{_pct(s['success_ci95'][0])}, {_pct(s['success_ci95'][1])}]"
            for s in (r["summary"][g] for g in groups)
        ]
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    out += ["\n### Paired difference from the base model (points, 95% interval; McNemar p)\n", head]
    for name, r in rows.items():
        if name == "base":
            continue
        cells = [
            f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]; "
            f"p={d['p_mcnemar']:.2g}"
            for d in (r["vs_base"][g] for g in groups)
        ]
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    pair_groups = [g for g in groups if g != "single"]
    out += [
        "\n### Attention while sampling (raw maps, the paper's): mean weakest-object peak / mean IoU\n",
        "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---:|" * len(pair_groups) + "\n",
    ]
    for r in rows.values():
        cells = [f"{r['summary'][g]['min_peak']:.3f} / {r['summary'][g]['iou']:.3f}" for g in pair_groups]
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    if all("missing" in r["summary"][g] for r in rows.values() for g in pair_groups):
        out += [
            "\n### Objects missing from pair images: nouns SepEn finetunes on / nouns it never sees\n",
            "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---:|" * len(pair_groups) + "\n",
        ]
        for r in rows.values():
            cells = [
                f"{r['summary'][g]['missing']['seen']} / {r['summary'][g]['missing']['unseen']}" for g in pair_groups
            ]
            out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    out += [
        "\n### SepEn finetuning (its training maps on pseudo-latents: mean of the first tenth of the steps "
        "-> the last)\n",
        (
            "| method | steps | lr | maps | lambda_sep / lambda_en / prior | seconds | weakest peak | IoU |\n"
            "|---|---:|---:|---|---|---:|---|---|\n"
        ),
    ]
    for r in rows.values():
        f = r.get("finetune")
        if f is None:
            continue
        c = f["recipe"]
        out.append(
            f"| {r['label']} | {c['steps']} | {c['learning_rate']:g} | {c['maps']['normalization']} | "
            f"{c['lambda_sep']:g} / {c['lambda_en']:g} / {c['prior_weight']:g} | {f['seconds']:.1f} | "
            f"{f['min_peak'][0]:.3f} -> {f['min_peak'][1]:.3f} | "
            f"{f['overlap'][0]:.3f} -> {f['overlap'][1]:.3f} |\n"
        )
    out += [
        "\n### Generation time per image, relative to the base model\n",
        "| method | seconds per image | ratio |\n|---|---:|---:|\n",
    ]
    for name, t in report["timing"].items():
        out.append(f"| {name} | {t['seconds_per_image']:.4f} | {t['ratio_to_base']:.2f} |\n")
    return "".join(out)


def grid(previews: dict[str, dict[str, list[Image.Image]]], group: str, scale: int = 3) -> Image.Image:
    """Rows: methods; columns: the same prompts and seeds. Nearest-neighbour upscaled."""
    rows = [m for m in GRID_METHODS if m in previews]
    columns = max(len(previews[m][group]) for m in rows)
    side, label_width, pad = 32 * scale, 120, 2
    image = Image.new("RGB", (label_width + columns * (side + pad), len(rows) * (side + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for r, method in enumerate(rows):
        draw.text((4, r * (side + pad) + side // 2 - 6), method, fill=(230, 230, 230))
        for c, tile in enumerate(previews[method][group]):
            image.paste(tile.resize((side, side), Image.NEAREST), (label_width + c * (side + pad), r * (side + pad)))
    return image


def run(model: BaseModel, world: World, config: BenchmarkConfig, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.jsonl").unlink(missing_ok=True)
    items = {g: group_items(world, g, config.items_per_group, config.seed) for g in config.groups}
    results, previews, adapters = {}, {}, {}
    for method in methods(config):
        start = time.perf_counter()
        numbers, previews[method.name], adapter = run_method(model, world, method, items, config)
        if adapter is not None and method.name in GRID_METHODS:  # the grids' methods are the ones timed
            adapters[method.name] = adapter
        results[method.name] = {"label": method.label, **numbers}
        with (out / "methods.jsonl").open("a") as progress:  # a run cut short keeps what it measured
            progress.write(json.dumps({"method": method.name, **numbers}) + "\n")
        successes = ", ".join(
            f"{g} {_pct(statistics.fmean(r['success'] for r in rec))}%" for g, rec in numbers["groups"].items()
        )
        log(f"{method.name}: {successes} ({time.perf_counter() - start:.0f} s)")
    base = results["base"]["groups"]
    for r in results.values():
        r["summary"] = {g: summarise(rec) for g, rec in r["groups"].items()}
        r["vs_base"] = {
            g: paired_difference([b["success"] for b in base[g]], [o["success"] for o in rec])
            for g, rec in r["groups"].items()
        }
        r["outcomes"] = {g: "".join("1" if x["success"] else "0" for x in rec) for g, rec in r.pop("groups").items()}
    report = {
        "config": config.to_dict(),
        "model": model.model_id,
        "device": str(model.device),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else None,
        },
        "groups": list(config.groups),
        "prompts": {g: [" / ".join(p) for p in group_pairs(world, g)] for g in config.groups},
        "methods": results,
        "timing": time_per_image(model, adapters, config),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "table.md").write_text(markdown(report))
    for group in config.groups:
        grid(previews, group).save(out / f"grid-{group}.png")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json, table.md and grid-*.png")
    parser.add_argument(
        "--model", default=str(BUNDLED_MODEL_DIR), help="a toy-world model directory (default: the bundled one)"
    )
    parser.add_argument("--items", type=int, default=BenchmarkConfig.items_per_group, help="items per group")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=list(BenchmarkConfig.finetune_seeds))
    parser.add_argument("--finetune-steps", type=int, help="override the model's recipe")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument(
        "--methods", nargs="+", default=[], help="run only these besides the base model (names as in the table's JSON)"
    )
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument(
        "--quick", action="store_true", help="4 items per group, one finetune seed of 2 steps, no ablations (CI)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        config = BenchmarkConfig(
            items_per_group=4,
            finetune_seeds=(0,),
            finetune_steps=2,
            ablations=False,
            timing_repeats=1,
            timing_images=2,
            grid_columns=4,
        )
    else:
        config = BenchmarkConfig(
            items_per_group=args.items,
            finetune_seeds=tuple(args.finetune_seeds),
            finetune_steps=args.finetune_steps,
            ablations=not args.no_ablations,
            only_methods=tuple(args.methods),
            groups=tuple(args.groups),
        )
    model = load_base_model(args.model, device=args.device)
    world_file = Path(args.model) / "world.json"
    report = run(model, load_world(world_file) if world_file.exists() else load_world(), config, Path(args.out))
    print(markdown(report))


if __name__ == "__main__":
    main()
