"""The toy-world benchmark: base model vs SepEn (one adapter per pair, training pairs, large-scale) vs
Attend-and-Excite, with paired seeds, 95% confidence intervals, failure kinds, per-image cost and image grids.

    python -m toyworld.benchmark --model DIR --out docs/NAME   # full: 400 items per group, 3 finetune seeds
    python -m toyworld.benchmark --model DIR --out /tmp/bench --quick   # 4 items per group, 2 finetune steps (CI)

Groups follow the model's world (toyworld/README.md). World v2 (a world with test pairs):
  single              every noun alone
  test_seen_seen      test pairs of two nouns SepEn may finetune on (large-scale SepEn's collection holds them)
  test_seen_unseen    test pairs with one noun no SepEn run sees
  test_unseen_unseen  test pairs of two such nouns
World v1:
  single          every noun alone
  seen_pairs      the 27 training pairs of the 9 finetuning nouns: what "SepEn on training pairs" finetunes on
  heldout_seen_seen  the 9 held-out pairs of finetuning nouns: never together in base training nor in SepEn's pairs
                     (the same group as toyworld.evaluate's; results.json of runs before it was renamed say
                     "heldout_pairs")
  unseen_concept  the 12 held-out pairs with a noun SepEn never sees (candle, flag, wedge)
Methods: the base model; SepEn per pair (one adapter per pair of the group, made the README's way,
`sepen finetune --pair A B --template "a {A} and a {B}"`, used for that pair's prompts: the paper's main
use); SepEn on the world's training pairs of finetuning nouns; SepEn large-scale; Attend-and-Excite.
Both caption orders of each pair are prompts. Every method samples the same items from the same noise
(item i of prompt j of group g starts from seed + 100000 g + 1000 j + i), so differences are paired:
the table gives each method's success with a Wilson interval, and its paired difference from the base
model with a 95% interval and McNemar's exact test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from sepen_core.harm_check import HarmCheckConfig, check_adapter
from sepen_core.models import BUNDLED_MODEL_DIR, BaseModel, load_base_model
from sepen_core.prompts import ConceptSet
from sepen_core.sampling import generate
from sepen_core.stats import mcnemar_p, paired_difference, wilson_interval  # noqa: F401 - re-exported
from toyworld.detector import detections, exact_success, find_candidates, object_success
from toyworld.evaluate import group_prompts, spread
from toyworld.failures import KINDS, failure_kinds
from toyworld.judge import WorldJudge
from toyworld.world import World, caption, load_world

V1_GROUPS = ("single", "seen_pairs", "heldout_seen_seen", "unseen_concept")
V2_GROUPS = ("single", "test_seen_seen", "test_seen_unseen", "test_unseen_unseen")
GROUPS = V1_GROUPS + V2_GROUPS[1:]  # every group; a group's place here seeds its items
# The world's caption forms: SepEn finetunes on prompts worded as the benchmark samples them.
TEMPLATE, PRIOR_TEMPLATE = "a {A} and a {B}", "a {A}"
GRID_METHODS = ("base", "sepen-per-pair-s0", "sepen-pairs-s0", "sepen-large-s0", "attend-excite")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "base", "sepen" or "attend_excite"
    # sepen: "per_pair" (one adapter per pair of the group), "pairs" (the world's training pairs of finetuning
    # nouns) or "large_scale" (random pairs of the finetuning nouns)
    concepts: str = ""
    seed: int = 0
    recipe: dict = field(default_factory=dict)  # overrides of the model's own recipe (ModelDefaults)
    label: str = ""
    attend_excite: bool = False  # sample with Attend-and-Excite (kind "attend_excite", or on top of a SepEn adapter)


@dataclass(frozen=True)
class BenchmarkConfig:
    items_per_group: int = 400
    finetune_seeds: tuple[int, ...] = (0, 1, 2)
    finetune_steps: int | None = None  # None: the model's recipe
    ablations: bool = True  # content maps and each loss alone, on SepEn pairs with the first finetune seed
    seed: int = 3_000_000
    timing_repeats: int = 5
    timing_images: int = 8
    grid_columns: int = 8
    only_methods: tuple[str, ...] = ()  # run these besides the base model (default: all)
    # The do-no-harm check (sepen_core.harm_check) of every per-pair adapter, with this many images per prompt and
    # side on its held-out seeds: does its verdict say what the benchmark's own items then show? 0: not run.
    check_samples: int = 0
    groups: tuple[str, ...] = ()  # () : the world's own (world_groups)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def methods(config: BenchmarkConfig) -> list[Method]:
    steps = {} if config.finetune_steps is None else {"steps": config.finetune_steps}
    rows = [Method("base", "base", label="base model")]
    for s in config.finetune_seeds:
        rows.append(Method(f"sepen-per-pair-s{s}", "sepen", "per_pair", s, dict(steps), f"SepEn, per pair (seed {s})"))
    for s in config.finetune_seeds:
        label = f"SepEn per pair + Attend-and-Excite (seed {s})"
        rows.append(Method(f"sepen-per-pair-excite-s{s}", "sepen", "per_pair", s, dict(steps), label, True))
    for s in config.finetune_seeds:
        rows.append(Method(f"sepen-pairs-s{s}", "sepen", "pairs", s, dict(steps), f"SepEn, training pairs (seed {s})"))
    for s in config.finetune_seeds:
        rows.append(
            Method(f"sepen-large-s{s}", "sepen", "large_scale", s, dict(steps), f"SepEn, large-scale (seed {s})")
        )
    rows.append(Method("attend-excite", "attend_excite", label="Attend-and-Excite", attend_excite=True))
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


def world_groups(world: World) -> tuple[str, ...]:
    """The groups a world is benchmarked on: its test pairs' groups where it has them (world v2), else v1's."""
    return V2_GROUPS if world.test_pairs else V1_GROUPS


def group_pairs(world: World, group: str) -> list[tuple[str, ...]]:
    """The noun tuples (both caption orders) a group samples, from the evaluation's groups."""
    if group in V2_GROUPS:
        return group_prompts(world, group)  # "single" and the test pairs' groups: the evaluation's own
    if group == "seen_pairs":
        unseen = set(world.unseen_in_finetuning)
        return [p for p in group_prompts(world, "train_pairs") if not set(p) & unseen]
    if group == "unseen_concept":
        return group_prompts(world, "heldout_seen_unseen") + group_prompts(world, "heldout_unseen_unseen")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose from {GROUPS}")
    return group_prompts(world, group)  # "heldout_seen_seen": the evaluation's own group


def group_items(world: World, group: str, n: int, seed: int) -> list[tuple[tuple[str, ...], list[int]]]:
    """n items spread as evenly as possible over the group's prompts: [(nouns, seeds)], paired across methods."""
    prompts = group_pairs(world, group)
    g = GROUPS.index(group)
    return [
        (nouns, [seed + 100_000 * g + 1000 * j + i for i in range(count)])
        for j, (nouns, count) in enumerate(zip(prompts, spread(n, len(prompts)), strict=True))
        if count
    ]


def sepen_concepts(world: World, kind: str, pair: tuple[str, ...] = ()) -> ConceptSet:
    if kind == "per_pair":  # the README's way: sepen finetune --pair A B --template "a {A} and a {B}"
        # (the world's caption of one object for the recipes with a prior loss; it draws nothing else)
        return ConceptSet(groups=(tuple(sorted(pair)),), templates=(TEMPLATE,), prior_template=PRIOR_TEMPLATE)
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


def finetune_adapter(model: BaseModel, concepts: ConceptSet, method: Method) -> tuple[KeyProjectionAdapter, dict]:
    """One SepEn adapter with the method's recipe, and how its training maps moved."""
    recipe = model.defaults.finetune_config(concepts.mode, {**method.recipe, "seed": method.seed})
    start = time.perf_counter()
    result = finetune(model, concepts, recipe, adapter_metadata={"name": method.name})
    # Each step sees other prompts and timesteps: compare the means of the first and last tenth of the run.
    window = max(1, len(result.history) // 10)
    first, last = result.history[:window], result.history[-window:]
    return result.adapter, {
        "adapters": 1,
        "seconds": time.perf_counter() - start,
        "recipe": recipe.to_dict(),
        "window": window,
        **{
            key: [statistics.fmean(getattr(r, key) for r in part) for part in (first, last)]
            for key in ("min_peak", "overlap", "loss")
        },
    }


def merged_finetunes(runs: list[dict]) -> dict:
    """Per-pair adapters: their count and total seconds, the mean of their maps' numbers, each one's check."""
    merged = {
        **runs[0],
        "adapters": len(runs),
        "seconds": sum(r["seconds"] for r in runs),
        **{key: [statistics.fmean(r[key][i] for r in runs) for i in (0, 1)] for key in ("min_peak", "overlap", "loss")},
    }
    if any("check" in r for r in runs):
        merged["check"] = {pair: c for r in runs for pair, c in r.get("check", {}).items()}
    return merged


def item_record(world: World, nouns: tuple[str, ...], pixels, scores, early_min_peak: float | None) -> dict:
    """One image's outcome: success, what is missing and why (toyworld.failures), its maps' scores."""
    candidates = find_candidates(world, pixels)
    detected = detections(candidates)
    missing = [n for n in set(nouns) if n not in detected]
    return {
        "success": object_success(detected, nouns),
        "exact": exact_success(detected, nouns),
        "found": len(set(nouns)) - len(missing),
        "named": len(set(nouns)),
        "missing_unseen": sum(n in world.unseen_in_finetuning for n in missing),
        "missing_seen": sum(n not in world.unseen_in_finetuning for n in missing),
        "missing_kinds": sorted(failure_kinds(candidates, nouns).values()) if len(nouns) > 1 else [],
        "min_peak": scores.min_peak,
        "early_min_peak": early_min_peak,
        "iou": scores.overlap,
    }


def checked_adapter(
    model: BaseModel, world: World, method: Method, pair: tuple[str, ...], config: BenchmarkConfig
) -> tuple[KeyProjectionAdapter, dict]:
    """A per-pair adapter and its finetune's numbers, with its do-no-harm check when the config asks for one."""
    concepts = sepen_concepts(world, "per_pair", pair)
    adapter, stats = finetune_adapter(model, concepts, method)
    if config.check_samples:
        check = HarmCheckConfig(config.check_samples, model.defaults.sample_config())
        report = check_adapter(model, adapter, concepts, check, judge=WorldJudge(world))
        stats["check"] = {" + ".join(sorted(pair)): {"verdict": report["verdict"], "pairs": report["pairs"]}}
    return adapter, stats


def run_method(
    model: BaseModel,
    world: World,
    method: Method,
    items: dict,
    config: BenchmarkConfig,
    made: dict | None = None,
) -> tuple[dict, dict, KeyProjectionAdapter | None]:
    """-> (numbers, {group: preview images}, the SepEn adapter or None: per-pair methods return their first).
    Per item: success, exact, missing objects and their kinds, the weakest raw peak (over the first quarter of the
    denoising steps and at the end) and the IoU while sampling. `made` keeps per-pair adapters across methods: a
    method with the same recipe and seed (SepEn per pair with A&E on top) samples with the same adapters."""
    adapter, numbers, per_pair, per_pair_runs = None, {}, {}, []
    made = {} if made is None else made
    if method.kind == "sepen" and method.concepts != "per_pair":
        adapter, numbers["finetune"] = finetune_adapter(model, sepen_concepts(world, method.concepts), method)
    excite = AttendExciteConfig() if method.attend_excite else None
    previews: dict[str, list[Image.Image]] = {}
    numbers["groups"] = {}
    for group, group_items_ in items.items():
        records = []
        previews[group] = []
        for nouns, seeds in group_items_:
            item_adapter = adapter
            if method.concepts == "per_pair" and len(nouns) == 2:  # single objects keep the base model
                key = frozenset(nouns)
                if key not in per_pair:
                    made_key = (key, method.seed, json.dumps(method.recipe, sort_keys=True))
                    if made_key not in made:
                        made[made_key] = checked_adapter(model, world, method, nouns, config)
                    per_pair[key], stats = made[made_key]
                    per_pair_runs.append(stats)
                item_adapter = per_pair[key]
            result = sample_items(model, nouns, seeds, item_adapter, excite)
            if len(previews[group]) < config.grid_columns:
                previews[group].append(result.images[0])
            quarter = (result.step_scores or [])[: max(1, len(result.step_scores or []) // 4)]
            for i, (pixels, scores) in enumerate(zip(result.pixels, result.scores, strict=True)):
                early = statistics.fmean(step[i].min_peak for step in quarter) if quarter else None
                records.append(item_record(world, nouns, pixels, scores, early))
        numbers["groups"][group] = records
    if per_pair_runs:
        numbers["finetune"] = merged_finetunes(per_pair_runs)
        adapter = next(iter(per_pair.values()))
    return numbers, previews, adapter


def time_per_image(
    model: BaseModel, adapters: dict[str, KeyProjectionAdapter], config: BenchmarkConfig, pair: tuple[str, ...]
) -> dict:
    """Median seconds per image of base, SepEn and A&E sampling on one pair's prompt, measured side by side in
    rotating order."""
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
                caption(pair),
                sample,
                adapter=adapter,
                attend_excite=excite,
                concepts=list(pair) if excite is not None else None,
            )
            if repeat:
                seconds[name].append((time.perf_counter() - start) / config.timing_images)
    base = statistics.median(seconds["base"])
    return {
        name: {"seconds_per_image": statistics.median(v), "ratio_to_base": statistics.median(v) / base}
        for name, v in seconds.items()
    }


# ---- statistics --------------------------------------------------------------------------------


def summarise(records: list[dict]) -> dict:
    n = len(records)
    success = sum(r["success"] for r in records)
    ious = [r["iou"] for r in records if r["iou"] is not None]
    failures = [r for r in records if not r["success"]]
    early = [r.get("early_min_peak") for r in records]  # None: recorded before early peaks were
    return {
        "n": n,
        "success": success / n,
        "success_ci95": list(wilson_interval(success, n)),
        "exact": sum(r["exact"] for r in records) / n,
        "min_peak": statistics.fmean(r["min_peak"] for r in records),
        "early_min_peak": statistics.fmean(early) if early and None not in early else None,
        "iou": statistics.fmean(ious) if ious else None,
        # Of the failures: how many named objects were still drawn (0 = none, 1 = one of a pair missing).
        "failures_by_found": {str(k): sum(r["found"] == k for r in failures) for k in range(3)},
        # Missing objects by kind: nouns used in SepEn finetuning, and nouns it never saw.
        "missing": {kind: sum(r[f"missing_{kind}"] for r in records) for kind in ("seen", "unseen")},
        # Missing objects by why (toyworld.failures): absent, misdrawn, fused, or the other object drawn twice.
        "missing_by_kind": {kind: sum(r.get("missing_kinds", []).count(kind) for r in records) for kind in KINDS},
    }


def per_pair(prompts: list[str], items: int, base: list[bool], runs: list[list[bool]]) -> dict:
    """A pair group's outcomes per pair (both caption orders pooled): each pair's paired difference from the base
    model (the mean over `runs`, a method's finetune seeds), the worst and the best pair, and how many pairs lose
    (significantly: McNemar's p < 0.05 in every run). `prompts` are the group's "A / B" prompts in item order, each
    with its share of `items` (evaluate.spread), as the benchmark samples them."""
    spans: dict[str, list[int]] = {}
    start = 0
    for prompt, count in zip(prompts, spread(items, len(prompts)), strict=True):
        if count:  # a short run samples only the first prompts of a group
            spans.setdefault(" + ".join(sorted(prompt.split(" / "))), []).extend(range(start, start + count))
        start += count
    pairs = {}
    for pair, rows in spans.items():
        before = [base[i] for i in rows]
        each = [paired_difference(before, [run[i] for i in rows]) for run in runs]
        pairs[pair] = {
            "n": len(rows),
            "base": sum(before) / len(rows),
            "difference": statistics.fmean(d["difference"] for d in each),
            "significant_loss": all(d["difference"] < 0 and d["p_mcnemar"] < 0.05 for d in each),
            "significant_gain": all(d["difference"] > 0 and d["p_mcnemar"] < 0.05 for d in each),
        }
    ranked = sorted(pairs, key=lambda k: pairs[k]["difference"])
    return {
        "pairs": pairs,
        "worst": ranked[0],
        "best": ranked[-1],
        "hurt": sum(pairs[k]["difference"] < 0 for k in ranked),
        "hurt_significantly": sum(pairs[k]["significant_loss"] for k in ranked),
        "count": len(ranked),
    }


def check_agreement(per_pair_groups: dict[str, dict], checks: dict[str, dict]) -> dict:
    """How the do-no-harm check's verdict on each adapter's own pair (its held-out seeds) compares with what the
    benchmark's items show for that pair: on the pairs whose difference there is significant (McNemar p < 0.05), how
    many verdicts say the same sign; and how many of the pairs it calls `hurts` lose there, and the reverse."""
    rows = [
        (numbers, checks[pair]["pairs"][0]["verdict"])
        for group in per_pair_groups.values()
        for pair, numbers in group["pairs"].items()
        if pair in checks
    ]
    significant = [(n, v) for n, v in rows if n["significant_loss"] or n["significant_gain"]]
    same = sum(
        (v == "hurts" and n["significant_loss"]) or (v == "helps" and n["significant_gain"]) for n, v in significant
    )
    flagged = [n for n, v in rows if v == "hurts"]
    return {
        "pairs": len(rows),
        "significant": len(significant),
        "same_sign": same,
        "verdicts": {v: sum(verdict == v for _, verdict in rows) for v in ("helps", "no clear effect", "hurts")},
        "hurts_and_lose": sum(n["difference"] < 0 for n in flagged),
        "significant_losses": sum(n["significant_loss"] for n, _ in rows),
        "significant_losses_flagged": sum(n["significant_loss"] and v == "hurts" for n, v in rows),
    }


def per_pair_cell(numbers: dict) -> str:
    """'worst a + b -25.0 (n 16), best c + d +12.5; 7 of 24 hurt (1 significantly)'."""
    pairs = numbers["pairs"]
    worst, best = numbers["worst"], numbers["best"]
    return (
        f"worst {worst} {100 * pairs[worst]['difference']:+.1f} (n {pairs[worst]['n']}), best {best} "
        f"{100 * pairs[best]['difference']:+.1f}; {numbers['hurt']} of {numbers['count']} hurt "
        f"({numbers['hurt_significantly']} significantly)"
    )


# ---- report ------------------------------------------------------------------------------------


def _bits(outcomes: str) -> list[bool]:
    return [c == "1" for c in outcomes]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


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
    if all("per_pair" in r for name, r in rows.items() if name != "base"):
        out += [
            "\n### Per pair (both caption orders): the worst and the best pair's difference from the base model in "
            "points, and how many pairs lose\n",
            "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---|" * len(pair_groups) + "\n",
        ]
        for name, r in rows.items():
            if name != "base":
                cells = [per_pair_cell(r["per_pair"][g]) for g in pair_groups]
                out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    checked = {name: r["check_agreement"] for name, r in rows.items() if "check_agreement" in r}
    if checked:
        out += [
            "\n### The do-no-harm check of each per-pair adapter (its own held-out seeds) against these items\n",
            "| method | pairs | verdicts helps / no clear effect / hurts | significant here: same sign | "
            "called hurts: lose here | significant losses here: called hurts |\n|---|---:|---|---|---|---|\n",
        ]
        for name, a in checked.items():
            v = a["verdicts"]
            out.append(
                f"| {rows[name]['label']} | {a['pairs']} | {v['helps']} / {v['no clear effect']} / {v['hurts']} | "
                f"{a['same_sign']} of {a['significant']} | {a['hurts_and_lose']} of {v['hurts']} | "
                f"{a['significant_losses_flagged']} of {a['significant_losses']} |\n"
            )
    out += [
        "\n### Attention while sampling (raw maps, the paper's): mean weakest-object peak over the first quarter "
        "of the steps / at the end / mean IoU\n",
        "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---:|" * len(pair_groups) + "\n",
    ]
    for r in rows.values():
        cells = [
            f"{_num(r['summary'][g].get('early_min_peak'))} / {r['summary'][g]['min_peak']:.3f} / "
            f"{_num(r['summary'][g]['iou'])}"
            for g in pair_groups
        ]
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
    if all("missing_by_kind" in r["summary"][g] for r in rows.values() for g in pair_groups):
        out += [
            "\n### Objects missing from pair images, by kind: " + " / ".join(KINDS) + "\n",
            "| method | " + " | ".join(pair_groups) + " |\n|---|" + "---:|" * len(pair_groups) + "\n",
        ]
        for r in rows.values():
            cells = [" / ".join(str(r["summary"][g]["missing_by_kind"][k]) for k in KINDS) for g in pair_groups]
            out.append(f"| {r['label']} | " + " | ".join(cells) + " |\n")
    out += [
        "\n### SepEn finetuning (its training maps on pseudo-latents: mean of the first tenth of the steps "
        "-> the last)\n",
        (
            "| method | adapters | steps | lr | maps | lambda_sep / lambda_en / prior | seconds | weakest peak "
            "| IoU |\n"
            "|---|---:|---:|---:|---|---|---:|---|---|\n"
        ),
    ]
    for r in rows.values():
        f = r.get("finetune")
        if f is None:
            continue
        c = f["recipe"]
        out.append(
            f"| {r['label']} | {f.get('adapters', 1)} | {c['steps']} | {c['learning_rate']:g} | "
            f"{c['maps']['normalization']} | "
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
    config = dataclasses.replace(config, groups=config.groups or world_groups(world))
    items = {g: group_items(world, g, config.items_per_group, config.seed) for g in config.groups}
    results, previews, adapters, made = {}, {}, {}, {}
    for method in methods(config):
        start = time.perf_counter()
        numbers, previews[method.name], adapter = run_method(model, world, method, items, config, made)
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
    timing_pair = next(nouns for group in items.values() for nouns, _ in group if len(nouns) == 2)
    for r in results.values():
        r["summary"] = {g: summarise(rec) for g, rec in r["groups"].items()}
        r["vs_base"] = {
            g: paired_difference([b["success"] for b in base[g]], [o["success"] for o in rec])
            for g, rec in r["groups"].items()
        }
        r["outcomes"] = {g: "".join("1" if x["success"] else "0" for x in rec) for g, rec in r.pop("groups").items()}
    prompts = {g: [" / ".join(p) for p in group_pairs(world, g)] for g in config.groups}
    sampled_with_excite = {m.name: m.attend_excite for m in methods(config)}
    for name, r in results.items():
        if name != "base":
            r["per_pair"] = {
                g: per_pair(prompts[g], config.items_per_group, _bits(results["base"]["outcomes"][g]), [_bits(o)])
                for g, o in r["outcomes"].items()
                if g != "single"
            }
        if "check" in r.get("finetune", {}) and not sampled_with_excite[name]:  # the check judges the plain adapter
            r["check_agreement"] = check_agreement(r["per_pair"], r["finetune"]["check"])
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
        "prompts": prompts,
        "methods": results,
        "timing": time_per_image(model, adapters, config, timing_pair),
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
    parser.add_argument("--groups", nargs="+", default=[], choices=GROUPS, help="default: the world's own groups")
    parser.add_argument(
        "--check-samples",
        type=int,
        default=0,
        help="run the do-no-harm check of every per-pair adapter with this many images per prompt and side",
    )
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
            check_samples=args.check_samples,
        )
    model = load_base_model(args.model, device=args.device)
    world_file = Path(args.model) / "world.json"
    report = run(model, load_world(world_file) if world_file.exists() else load_world(), config, Path(args.out))
    print(markdown(report))


if __name__ == "__main__":
    main()
