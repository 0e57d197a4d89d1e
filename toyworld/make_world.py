"""Build world v2 (world-v2.json) from its design: 24 nouns, Zipf frequencies, sparse co-occurrence, three pair roles.

    python -m toyworld.make_world --out toyworld/world-v2.json

Everything here was fixed before any SepEn run on the world (toyworld/README.md, "World v2"):

* 24 single-token nouns: 12 bright colours x 2 shapes that differ at the coarsest scale a small model
  sees (a compact disc, a 2.5:1 horizontal bar). No fine detail (triangle orientation, a plus against
  a diamond) separates two nouns: v1's failures were largely such misdrawn shapes.
* Frequencies: the nouns' single-object captions follow Zipf's law (weight 1/rank), as words do in
  web captions; ranks alternate disc and bar nouns, so neither shape is the frequent one.
* Co-occurrence is sparse and skewed to common nouns: two-object captions name only 12 of the 276
  pairs, one random Hamiltonian cycle through the 12 most frequent nouns (each has exactly 2 training
  partners); the 12 rarer nouns are seen only alone. This was chosen among three candidates by a rule
  fixed before they were trained (toyworld/README.md, "Choosing the co-occurrence"); --paired and
  --partners write the others (the first design was all 24 nouns with 4 partners: 48 pairs).
* The 8 nouns no SepEn run sees are every third rank (ranks 3, 6, ..., 24): they span the frequency
  range and are 4 discs and 4 bars.
* Evaluation pairs, all never together in base training: validation (16 seen+seen: the only pairs
  used to choose anything) and test (24 seen+seen, 24 seen+unseen, 12 unseen+unseen), each drawn
  so that every noun appears about equally often in its group.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from toyworld.world import World

COLOURS = {  # name: RGB; all bright and at least 127 apart, so blurred (dark) edges never read as a glyph colour
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
    "azure": (0, 128, 255),
    "pink": (255, 128, 255),
    "lime": (128, 255, 0),
    "purple": (128, 0, 255),
}
# colour: (disc noun, bar noun); every noun is one CLIP BPE token and starts with a consonant ("a ...").
NOUNS = {
    "red": ("cherry", "brick"),
    "green": ("melon", "bench"),
    "blue": ("planet", "bus"),
    "yellow": ("lemon", "banana"),
    "magenta": ("donut", "sofa"),
    "cyan": ("bubble", "boat"),
    "white": ("moon", "fence"),
    "orange": ("coin", "pencil"),
    "azure": ("ball", "train"),
    "pink": ("peach", "plank"),
    "lime": ("button", "ladder"),
    "purple": ("plate", "truck"),
}
SEED = 2026
PAIRED_NOUNS = 12  # the most frequent nouns that appear in base training's two-object captions
TRAIN_PARTNERS = 2  # training partners of each of them (even: partners / 2 edge-disjoint cycles)
GROUP_SIZES = {"validation": 16, "test_seen_seen": 24, "test_seen_unseen": 24, "test_unseen_unseen": 12}


def frequency_ranks(rng: np.random.Generator) -> list[str]:
    """All nouns, most frequent first: a shuffled disc noun, a shuffled bar noun, alternating."""
    discs = [NOUNS[c][0] for c in rng.permutation(list(NOUNS))]
    bars = [NOUNS[c][1] for c in rng.permutation(list(NOUNS))]
    return [noun for pair in zip(discs, bars, strict=True) for noun in pair]


def hamiltonian_cycles(nouns: list[str], count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Edges of `count` edge-disjoint random cycles through every noun (a connected 2*count-regular graph)."""
    while True:
        edges: set[frozenset] = set()
        for _ in range(count):
            order = [nouns[i] for i in rng.permutation(len(nouns))]
            cycle = {frozenset((order[i], order[(i + 1) % len(order)])) for i in range(len(order))}
            if cycle & edges:
                break
            edges |= cycle
        else:
            return sorted(tuple(sorted(e)) for e in edges)


def balanced_pairs(candidates: list[tuple[str, str]], size: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`size` candidate pairs in which no noun appears more often than a uniform draw would give it on average
    (rounded up): each noun's share of the group follows its share of the candidates, not the luck of the draw."""
    degree = {n: sum(n in p for p in candidates) for p in candidates for n in p}
    cap = {n: -(-size * d // len(candidates)) for n, d in degree.items()}
    for _ in range(10_000):
        counts = dict.fromkeys(degree, 0)
        chosen = []
        for i in rng.permutation(len(candidates)):
            a, b = candidates[i]
            if counts[a] < cap[a] and counts[b] < cap[b]:
                chosen.append(candidates[i])
                counts[a] += 1
                counts[b] += 1
                if len(chosen) == size:
                    return sorted(chosen)
    raise ValueError(f"cannot choose {size} balanced pairs from {len(candidates)}")


def build_world(seed: int = SEED, paired: int = PAIRED_NOUNS, partners: int = TRAIN_PARTNERS) -> World:
    if partners < 2 or partners % 2 or partners >= paired or paired > len(COLOURS) * 2:
        raise ValueError("build_world: partners must be even, >= 2 and < paired; paired at most the 24 nouns")
    rng = np.random.default_rng(seed)
    ranked = frequency_ranks(rng)
    unseen = ranked[2::3]
    glyphs = [
        {
            "noun": noun,
            "shape": shape,
            "colour": list(COLOURS[colour]),
            "frequency": round(1 / (ranked.index(noun) + 1), 6),
        }
        for colour, nouns in NOUNS.items()
        for noun, shape in zip(nouns, ("disc", "hbar"), strict=True)
    ]
    train = hamiltonian_cycles(ranked[:paired], partners // 2, rng)
    heldout = [p for p in combinations(sorted(ranked), 2) if frozenset(p) not in {frozenset(t) for t in train}]
    by_unseen = {k: [p for p in heldout if sum(n in unseen for n in p) == k] for k in (0, 1, 2)}
    validation = balanced_pairs(by_unseen[0], GROUP_SIZES["validation"], rng)
    seen_seen = [p for p in by_unseen[0] if p not in validation]
    test = (
        balanced_pairs(seen_seen, GROUP_SIZES["test_seen_seen"], rng)
        + balanced_pairs(by_unseen[1], GROUP_SIZES["test_seen_unseen"], rng)
        + balanced_pairs(by_unseen[2], GROUP_SIZES["test_unseen_unseen"], rng)
    )
    return World.from_dict(
        {
            "version": 2,
            "image_size": 32,
            "min_size": 8,
            "max_size": 11,
            "bar_ratio": 2.5,
            "gap": 2,
            "margin": 1,
            "glyphs": glyphs,
            "unseen_in_finetuning": sorted(unseen),
            "train_pairs": train,
            "heldout_pairs": heldout,
            "validation_pairs": validation,
            "test_pairs": test,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write world v2's definition (nouns, frequencies, pair roles).")
    parser.add_argument("--out", default=str(Path(__file__).with_name("world-v2.json")))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--paired", type=int, default=PAIRED_NOUNS, help="the most frequent nouns seen in pairs")
    parser.add_argument("--partners", type=int, default=TRAIN_PARTNERS, help="training partners of each paired noun")
    args = parser.parse_args(argv)
    world = build_world(args.seed, args.paired, args.partners)
    about = (
        "Toy world v2 (toyworld/README.md; built by toyworld/make_world.py). train_pairs are the only two-object "
        "captions of base training; validation_pairs choose recipes and settings; test_pairs fill the final table; "
        "unseen_in_finetuning nouns are never used by SepEn finetuning; frequency weighs single-object captions."
    )
    Path(args.out).write_text(json.dumps({"about": about, **world.to_dict()}, indent=1) + "\n")
    print(
        f"wrote {args.out}: {len(world.nouns)} nouns, {len(world.train_pairs)} training pairs, "
        f"{len(world.validation_pairs)} validation and {len(world.test_pairs)} test pairs"
    )


if __name__ == "__main__":
    main()
