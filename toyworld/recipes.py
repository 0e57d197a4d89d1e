"""Choose SepEn's recipes on validation pairs, never on test pairs. Per pair (the default): for each candidate recipe,
one adapter per pair made the README's way (`sepen finetune --pair A B --template "a {A} and a {B}"`), scored on its
own pair in both caption orders against the base model on the same seeds: per pair and pooled (paired difference,
McNemar's test), the worst pair, the share of pairs it hurts, and each candidate against the current default with
Holm's correction for the number of candidates. Large-scale (--mode large-scale): one adapter per recipe on the
world's collection, scored on every chosen pair. Results are written after every adapter, so a run cut short keeps
what it measured; runs of other candidates on the same pairs and seeds are joined by `--join`.

    python -m toyworld.recipes --model sepen_core/bundled/sepen-toy --out docs/toyworld-v2d/validation-a.json \
        --split validation --pairs 16 --samples 16 --recipes default identity
    python -m toyworld.recipes --join docs/toyworld-v2d/validation-*.json --out docs/toyworld-v2d/validation.json

`--split development` draws pairs that have no role in the world (neither validation nor test): for trying a
recipe out before it is registered, never for choosing one.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from statistics import NormalDist

import torch

from sepen_core.finetuning import finetune
from sepen_core.models import BaseModel, load_base_model
from sepen_core.prompts import ConceptSet
from sepen_core.stats import holm
from toyworld.benchmark import PRIOR_TEMPLATE, paired_difference, sample_items, sepen_concepts
from toyworld.detector import detect, object_success
from toyworld.evaluate import spread
from toyworld.world import World, load_world

README_TEMPLATE = "a {A} and a {B}"
# The candidates. The first five were compared on 2026-11-30 (docs/toyworld-benchmark.md; "model-default" was then
# lr 1e-3); the four after them are registered in toyworld/README.md ("Recipes that keep identities") before their
# first validation run. "default" is the model's recipe as it stands (lr 1e-4: the reference the others are judged by).
CANDIDATES = {
    "model-default": {"learning_rate": 1e-3},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr1e-4": {"learning_rate": 1e-4},
    "generated": {"latents": "generated", "learning_rate": 1e-3},
    "generated-lr3e-4": {"latents": "generated", "learning_rate": 3e-4},
    "default": {},
    "trajectory": {"latents": "trajectory"},
    "teacher": {"latents": "attend-excite", "teacher_weight": 1.0, "trajectory_window": (0.0, 0.7)},
    "identity": {"prior_weight": 1.0, "learning_rate": 3e-4},
    "trajectory-identity": {"latents": "trajectory", "prior_weight": 1.0, "learning_rate": 3e-4},
    "identity-lr1e-4": {"prior_weight": 1.0},  # tried on development pairs only (no different from "default")
}
REFERENCE = "default"
SPLITS = ("validation", "development")


def chosen_pairs(world: World, split: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` pairs of the split: validation pairs spread over the list (each noun about equally often), or
    development pairs drawn at random among the held-out pairs that are neither validation nor test pairs."""
    if split == "validation":
        pairs = list(world.validation_pairs)
        if not pairs:
            raise SystemExit("this world has no validation pairs (world v2 has them)")
        picks = [i for i, n in enumerate(spread(count, len(pairs))) if n]
        return [tuple(pairs[i]) for i in picks]
    roles = {frozenset(p) for p in world.validation_pairs + world.test_pairs}
    free = sorted(tuple(sorted(p)) for p in world.heldout_pairs if frozenset(p) not in roles)
    return random.Random(seed).sample(free, min(count, len(free)))


def _orders(pair: tuple[str, str], orders: int) -> list[tuple[str, str]]:
    return [pair, pair[::-1]][:orders]


def successes(model: BaseModel, world: World, nouns: tuple[str, str], seeds: list[int], adapter=None) -> list[bool]:
    result = sample_items(model, nouns, seeds, adapter, None)
    return [bool(object_success(detect(world, pixels), nouns)) for pixels in result.pixels]


def pair_successes(model, world, pair, seeds, orders, adapter=None) -> list[bool]:
    """The pair's items: every seed in each caption order, in that order."""
    return [s for nouns in _orders(pair, orders) for s in successes(model, world, nouns, seeds, adapter)]


def _key(pair) -> str:
    return " + ".join(pair)


def run(model: BaseModel, world: World, args: argparse.Namespace, out: Path, log=print) -> dict:
    pairs = chosen_pairs(world, args.split, args.pairs)
    seeds = [args.seed + i for i in range(args.samples)]
    report: dict = {
        "model": args.model,
        "mode": args.mode,
        "split": args.split,
        "pairs": pairs,
        "orders": args.orders,
        "samples_per_order": args.samples,
        "seed": args.seed,
        "candidates": {name: CANDIDATES[name] for name in args.recipes},
    }
    report["base"] = {_key(p): pair_successes(model, world, p, seeds, args.orders) for p in pairs}
    report["recipes"] = {}
    for name in args.recipes:
        per_pair = {}
        for finetune_seed in args.finetune_seeds:
            given = {**CANDIDATES[name], "seed": finetune_seed, **({"steps": args.steps} if args.steps else {})}
            shared = None
            if args.mode == "large-scale":  # one adapter for every pair
                concepts = sepen_concepts(world, "large_scale")
                recipe = model.defaults.finetune_config(concepts.mode, given)
                start = time.perf_counter()
                shared = finetune(model, concepts, recipe).adapter
                seconds = time.perf_counter() - start
            for pair in pairs:
                if shared is None:
                    concepts = ConceptSet(groups=(pair,), templates=(README_TEMPLATE,), prior_template=PRIOR_TEMPLATE)
                    recipe = model.defaults.finetune_config(concepts.mode, given)
                    start = time.perf_counter()
                    adapter = finetune(model, concepts, recipe).adapter
                    seconds = time.perf_counter() - start
                else:
                    adapter = shared
                key = f"{_key(pair)} / seed {finetune_seed}"
                with_adapter = pair_successes(model, world, pair, seeds, args.orders, adapter)
                base = report["base"][_key(pair)]
                per_pair[key] = {
                    "recipe": recipe.to_dict(),
                    "finetune_seconds": seconds,
                    "adapter": with_adapter,
                    **paired_difference(base, with_adapter),
                }
                log(f"{name} {key}: {sum(base)}/{len(base)} -> {sum(with_adapter)}/{len(base)} ({seconds:.0f} s)")
                report["recipes"][name] = {"per_pair": per_pair}
                out.write_text(json.dumps(summarised(report), indent=1) + "\n")
    return summarised(report)


def summarised(report: dict) -> dict:
    """The report with each recipe's pooled numbers, per-pair extremes and comparison with the reference."""
    for numbers in report["recipes"].values():
        numbers["pooled"] = _pooled(report["base"], numbers["per_pair"])
        numbers["pairs"] = _pair_extremes(numbers["per_pair"])
    names = [n for n in report["recipes"] if n != REFERENCE]
    if REFERENCE in report["recipes"]:
        comparisons = {n: _against(report["recipes"][REFERENCE], report["recipes"][n]) for n in names}
        for name, p in zip(comparisons, holm([c["p_mcnemar"] for c in comparisons.values()]), strict=True):
            comparisons[name]["p_holm"] = p
            comparisons[name]["ci_bonferroni"] = _interval(comparisons[name], len(comparisons))
        report["against_reference"] = comparisons
        report["choice"] = choose(report)
    return report


def _interval(comparison: dict, tests: int) -> list[float]:
    """The difference's two-sided interval at the Bonferroni level 0.05 / tests (normal, paired)."""
    z = NormalDist().inv_cdf(1 - 0.025 / max(tests, 1))
    diff, (low, _) = comparison["difference"], comparison["ci95"]
    half = (diff - low) / 1.96 * z
    return [diff - half, diff + half]


def choose(report: dict) -> dict:
    """The rule registered in toyworld/README.md: the candidate with the largest pooled gain over the reference among
    those better than it at Holm-adjusted p < 0.05; the reference when none is."""
    better = {n: c for n, c in report["against_reference"].items() if c["difference"] > 0 and c["p_holm"] < 0.05}
    if not better:
        return {"recipe": REFERENCE, "why": "no candidate beats the reference at Holm-adjusted p < 0.05"}
    name = max(better, key=lambda n: better[n]["difference"])
    return {"recipe": name, "why": "the largest significant gain over the reference", **better[name]}


def _against(reference: dict, other: dict) -> dict:
    """other - reference on the same items (both recipes' adapters, per pair and finetune seed)."""
    before = [s for key in other["per_pair"] for s in reference["per_pair"][key]["adapter"]]
    after = [s for key in other["per_pair"] for s in other["per_pair"][key]["adapter"]]
    return paired_difference(before, after)


def _pooled(base: dict[str, list[bool]], per_pair: dict[str, dict]) -> dict:
    before, after = [], []
    for key, numbers in per_pair.items():
        before += base[key.split(" / ")[0]]
        after += numbers["adapter"]
    return {"n": len(before), "base": sum(before) / len(before), "sepen": sum(after) / len(after)} | (
        paired_difference(before, after)
    )


def _pair_extremes(per_pair: dict[str, dict]) -> dict:
    """The worst and best pair, and how many pairs the recipe hurts or helps (significantly: McNemar p < 0.05)."""
    ranked = sorted(per_pair, key=lambda k: per_pair[k]["difference"])
    hurt = [k for k in ranked if per_pair[k]["difference"] < 0]
    return {
        "count": len(ranked),
        "worst": {"pair": ranked[0], "difference": per_pair[ranked[0]]["difference"]},
        "best": {"pair": ranked[-1], "difference": per_pair[ranked[-1]]["difference"]},
        "hurt": len(hurt),
        "hurt_significantly": sum(per_pair[k]["p_mcnemar"] < 0.05 for k in hurt),
        "helped_significantly": sum(per_pair[k]["p_mcnemar"] < 0.05 and per_pair[k]["difference"] > 0 for k in ranked),
    }


def join(reports: list[dict]) -> dict:
    """Runs of other candidates on the same pairs, orders and seeds as one report (their base outcomes must agree)."""
    first = reports[0]
    joined = {**first, "recipes": {}, "candidates": {}}
    for report in reports:
        if report["base"] != first["base"]:
            raise SystemExit("these runs did not sample the same items (their base outcomes differ)")
        joined["recipes"].update({n: {"per_pair": r["per_pair"]} for n, r in report["recipes"].items()})
        joined["candidates"].update(report.get("candidates", {}))
    return summarised(joined)


def markdown(report: dict) -> str:
    rows = [
        f"| recipe | n | base | SepEn ({report.get('mode', 'per-pair')}) | difference [95% CI] | McNemar p | "
        "worst pair | best pair | pairs hurt (significantly) |",
        "|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for name, numbers in report["recipes"].items():
        p, x = numbers["pooled"], numbers["pairs"]
        low, high = p["ci95"]
        rows.append(
            f"| {name} | {p['n']} | {p['base']:.1%} | {p['sepen']:.1%} | "
            f"{p['difference']:+.1%} [{low:+.1%}, {high:+.1%}] | {p['p_mcnemar']:.3g} | "
            f"{x['worst']['pair']}: {x['worst']['difference']:+.0%} | {x['best']['pair']}: "
            f"{x['best']['difference']:+.0%} | {x['hurt']} of {x['count']} ({x['hurt_significantly']}) |"
        )
    if report.get("against_reference"):
        rows += [
            "",
            f"| against `{REFERENCE}` | difference | Bonferroni interval | gained / lost | McNemar p | Holm p |",
            "|---|---:|---|---|---:|---:|",
        ]
        for name, c in report["against_reference"].items():
            low, high = c["ci_bonferroni"]
            rows.append(
                f"| {name} | {c['difference']:+.1%} | [{low:+.1%}, {high:+.1%}] | {c['gained']} / {c['lost']} | "
                f"{c['p_mcnemar']:.3g} | {c['p_holm']:.3g} |"
            )
        rows += ["", f"Chosen: **{report['choice']['recipe']}** ({report['choice']['why']})."]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a toy-world model directory (with its world.json)")
    parser.add_argument("--out", required=True, help="JSON file (a .md table is written beside it)")
    parser.add_argument("--join", nargs="+", metavar="JSON", help="join runs of other candidates into --out")
    parser.add_argument(
        "--mode", choices=("per-pair", "large-scale"), default="per-pair", help="which SepEn recipe is chosen"
    )
    parser.add_argument("--split", choices=SPLITS, default="validation", help="where the pairs come from")
    parser.add_argument("--pairs", type=int, default=16, help="pairs scored (per pair: one adapter each)")
    parser.add_argument("--orders", type=int, choices=(1, 2), default=2, help="caption orders of each pair sampled")
    parser.add_argument("--samples", type=int, default=16, help="images per caption order, same seeds on every side")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--recipes", nargs="+", default=[REFERENCE], choices=list(CANDIDATES))
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="finetune steps (default: the model's recipe)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.join:
        report = join([json.loads(Path(p).read_text()) for p in args.join])
        out.write_text(json.dumps(report, indent=1) + "\n")
    else:
        if not args.model:
            parser.error("--model is needed (or --join)")
        torch.set_num_threads(args.threads)
        model_dir = Path(args.model)
        report = run(load_base_model(model_dir), load_world(model_dir / "world.json"), args, out)
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
