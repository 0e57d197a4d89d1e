"""Choose SepEn's recipes on validation pairs, never on test pairs. Per pair (the default): for each candidate recipe,
one adapter per validation pair made the README's way (`sepen finetune --pair A B --template "a {A} and a {B}"`),
and its success on its own pair against the base model on the same seeds, pooled over the pairs (paired
difference, McNemar's test). Large-scale (--mode large-scale): one adapter per recipe on the world's collection
(random pairs of the finetuning nouns, as the benchmark makes it), scored on every chosen validation pair.
Results are written after every adapter, so a run cut short keeps what it measured.

    python -m toyworld.recipes --model sepen_core/bundled/sepen-toy --out docs/toyworld-v2c/recipes.json --pairs 4
    python -m toyworld.recipes --model sepen_core/bundled/sepen-toy --out docs/toyworld-v2c/recipes-large.json \
        --mode large-scale --pairs 16 --samples 12 --recipes model-default lr3e-4 lr1e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sepen_core.finetuning import finetune
from sepen_core.models import BaseModel, load_base_model
from sepen_core.prompts import ConceptSet
from toyworld.benchmark import paired_difference, sample_items, sepen_concepts
from toyworld.detector import detect, object_success
from toyworld.evaluate import spread
from toyworld.world import World, load_world

README_TEMPLATE = "a {A} and a {B}"
# The candidates: the model's own recipe (lr 1e-3, pseudo-latents, as the README uses it) and what the v1 probes
# suggested (a smaller rate), each with Gaussian pseudo-latents (the paper) or the model's own samples.
CANDIDATES = {
    "model-default": {},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr1e-4": {"learning_rate": 1e-4},
    "generated": {"latents": "generated"},
    "generated-lr3e-4": {"latents": "generated", "learning_rate": 3e-4},
}


def validation_pairs(world: World, count: int) -> list[tuple[str, str]]:
    """`count` validation pairs spread over the list (each noun about equally often)."""
    pairs = list(world.validation_pairs)
    if not pairs:
        raise SystemExit("this world has no validation pairs (world v2 has them)")
    picks = [i for i, n in enumerate(spread(count, len(pairs))) if n]
    return [tuple(pairs[i]) for i in picks]


def successes(model: BaseModel, world: World, pair: tuple[str, str], seeds: list[int], adapter=None) -> list[bool]:
    result = sample_items(model, pair, seeds, adapter, None)
    return [bool(object_success(detect(world, pixels), pair)) for pixels in result.pixels]


def run(model: BaseModel, world: World, args: argparse.Namespace, out: Path, log=print) -> dict:
    pairs = validation_pairs(world, args.pairs)
    seeds = [args.seed + i for i in range(args.samples)]
    report: dict = {
        "model": args.model,
        "mode": args.mode,
        "pairs": pairs,
        "samples_per_pair": args.samples,
        "seed": args.seed,
    }
    report["base"] = {" + ".join(p): successes(model, world, p, seeds) for p in pairs}
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
                    concepts = ConceptSet.pairs(pair, templates=(README_TEMPLATE,))
                    recipe = model.defaults.finetune_config(concepts.mode, given)
                    start = time.perf_counter()
                    adapter = finetune(model, concepts, recipe).adapter
                    seconds = time.perf_counter() - start
                else:
                    adapter = shared
                key = f"{' + '.join(pair)} / seed {finetune_seed}"
                with_adapter = successes(model, world, pair, seeds, adapter)
                base = report["base"][" + ".join(pair)]
                per_pair[key] = {
                    "recipe": recipe.to_dict(),
                    "finetune_seconds": seconds,
                    "adapter": with_adapter,
                    **paired_difference(base, with_adapter),
                }
                log(f"{name} {key}: {sum(base)}/{len(base)} -> {sum(with_adapter)}/{len(base)} ({seconds:.0f} s)")
                report["recipes"][name] = {"per_pair": per_pair, "pooled": _pooled(report["base"], per_pair)}
                out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _pooled(base: dict[str, list[bool]], per_pair: dict[str, dict]) -> dict:
    before, after = [], []
    for key, numbers in per_pair.items():
        before += base[key.split(" / ")[0]]
        after += numbers["adapter"]
    return {"n": len(before), "base": sum(before) / len(before), "sepen": sum(after) / len(after)} | (
        paired_difference(before, after)
    )


def markdown(report: dict) -> str:
    rows = [
        f"| recipe | n | base | SepEn ({report.get('mode', 'per-pair')}) | difference [95% CI] | McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    for name, numbers in report["recipes"].items():
        p = numbers["pooled"]
        low, high = p["ci95"]
        rows.append(
            f"| {name} | {p['n']} | {p['base']:.1%} | {p['sepen']:.1%} | "
            f"{p['difference']:+.1%} [{low:+.1%}, {high:+.1%}] | {p['p_mcnemar']:.3g} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a toy-world model directory (with its world.json)")
    parser.add_argument("--out", required=True, help="JSON file (a .md table is written beside it)")
    parser.add_argument(
        "--mode", choices=("per-pair", "large-scale"), default="per-pair", help="which SepEn recipe is chosen"
    )
    parser.add_argument("--pairs", type=int, default=4, help="validation pairs scored (per pair: one adapter each)")
    parser.add_argument("--samples", type=int, default=48, help="images per pair, same seeds for base and adapter")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--recipes", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--finetune-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="finetune steps (default: the model's recipe)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    world = load_world(model_dir / "world.json")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(load_base_model(model_dir), world, args, out)
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
