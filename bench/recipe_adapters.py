"""How far apart the per-pair recipes' adapters are on one validation pair of the toy model: each adapter's largest and
root-mean-square key change, and the cosine and sign agreement of every two (issue 22's validation reading).

    OMP_NUM_THREADS=1 python bench/recipe_adapters.py > bench/results-recipe-adapters.txt
"""

from __future__ import annotations

import itertools

import torch

from sepen_core.finetuning import finetune
from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
from sepen_core.prompts import ConceptSet
from toyworld.recipes import CANDIDATES

PAIR = ("ball", "train")  # the first validation pair
RECIPES = {
    "default": CANDIDATES["default"],
    "trajectory": CANDIDATES["trajectory"],
    "identity": CANDIDATES["identity"],
    "default-seed1": {"seed": 1},  # how far a second finetune seed moves the same recipe
}


def main() -> None:
    torch.set_num_threads(1)
    model = load_base_model(BUNDLED_MODEL_DIR)
    concepts = ConceptSet(groups=(PAIR,), templates=("a {A} and a {B}",), prior_template="a {A}")
    deltas = {}
    for name, given in RECIPES.items():
        config = model.defaults.finetune_config("groups", {**given, "check_samples": 0})
        adapter = finetune(model, concepts, config).adapter
        deltas[name] = torch.cat([d.flatten().float() for _, d in sorted(adapter.deltas.items())])
        change = deltas[name]
        print(f"{name} max |delta| {change.abs().max().item():.4f} rms {change.pow(2).mean().sqrt().item():.4f}")
    for a, b in itertools.combinations(deltas, 2):
        x, y = deltas[a], deltas[b]
        cosine = (x @ y / x.norm() / y.norm()).item()
        signs = (torch.sign(x) == torch.sign(y)).float().mean().item()
        print(f"{a} / {b}: cosine {cosine:.3f}, sign agreement {signs:.3f}")


if __name__ == "__main__":
    main()
