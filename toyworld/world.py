"""The toy world: single-token nouns drawn as glyphs on black; scenes, captions, renders, deterministic from a seed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np

WORLD_FILE = Path(__file__).with_name("world.json")
SHAPES = (
    "disc",
    "square",
    "ring",
    "frame",
    "tri_up",
    "tri_down",
    "tri_left",
    "tri_right",
    "plus",
    "diamond",
    "hbar",
    "vbar",
)
RING_HOLE = 0.5  # hole radius (ring) or half-side (frame) as a fraction of the glyph's half-size
PLUS_ARM = 0.36  # half-width of the plus's arms as a fraction of its half-size


@dataclass(frozen=True)
class Glyph:
    noun: str
    shape: str
    colour: tuple[int, int, int]  # RGB, 0..255
    frequency: float = 1.0  # relative weight of the noun among base training's single-object captions


@dataclass(frozen=True)
class World:
    """The nouns, their glyphs, the pair split, and the scene layout rules (world.json)."""

    image_size: int
    min_size: int  # a glyph's longer side in pixels, drawn uniformly from [min_size, max_size]
    max_size: int
    bar_ratio: float  # long side / short side of the bars
    gap: int  # empty pixels between any two objects' boxes (so objects never touch, even blurred)
    margin: int  # empty pixels between an object and the border
    glyphs: tuple[Glyph, ...]
    unseen_in_finetuning: tuple[str, ...]
    train_pairs: tuple[tuple[str, str], ...]  # the only two-object scenes of base training
    heldout_pairs: tuple[tuple[str, str], ...]  # never together in base training
    # World v2 splits the held-out pairs it evaluates into two roles: validation pairs choose everything
    # (recipes, guidance, thresholds); test pairs only fill the final table. Both are among heldout_pairs.
    validation_pairs: tuple[tuple[str, str], ...] = ()
    test_pairs: tuple[tuple[str, str], ...] = ()
    version: int = 1

    def __post_init__(self):
        nouns = self.nouns
        if len(set(nouns)) != len(nouns) or any(g.shape not in SHAPES for g in self.glyphs):
            raise ValueError("world: nouns must be distinct and shapes among " + ", ".join(SHAPES))
        pairs = [frozenset(p) for p in self.train_pairs + self.heldout_pairs]
        if any(len(p) != 2 or not p <= set(nouns) for p in pairs) or len(set(pairs)) != len(pairs):
            raise ValueError("world: pairs must be distinct pairs of distinct known nouns, in one list only")
        if not set(self.unseen_in_finetuning) <= set(nouns):
            raise ValueError("world: unseen_in_finetuning names an unknown noun")
        heldout = {frozenset(p) for p in self.heldout_pairs}
        validation, test = ({frozenset(p) for p in pairs} for pairs in (self.validation_pairs, self.test_pairs))
        if not (validation | test) <= heldout or validation & test:
            raise ValueError("world: validation_pairs and test_pairs must be disjoint sets of held-out pairs")
        if any(g.frequency <= 0 for g in self.glyphs):
            raise ValueError("world: every glyph's frequency must be > 0")

    @property
    def nouns(self) -> tuple[str, ...]:
        return tuple(g.noun for g in self.glyphs)

    @property
    def finetune_nouns(self) -> tuple[str, ...]:
        """The nouns SepEn finetuning may use ("seen"); the rest stay unseen until evaluation."""
        return tuple(n for n in self.nouns if n not in self.unseen_in_finetuning)

    def glyph(self, noun: str) -> Glyph:
        for g in self.glyphs:
            if g.noun == noun:
                return g
        raise KeyError(f"unknown noun {noun!r}; the world has {', '.join(self.nouns)}")

    def is_heldout(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in {frozenset(p) for p in self.heldout_pairs}

    def train_triples(self) -> tuple[tuple[str, str, str], ...]:
        """Three nouns whose three pairs are all training pairs: the only three-object scenes training may use."""
        train = {frozenset(p) for p in self.train_pairs}
        return tuple(t for t in combinations(self.nouns, 3) if all(frozenset(p) in train for p in combinations(t, 2)))

    def pair_role(self, a: str, b: str) -> str:
        """'train', 'validation', 'test' or 'heldout' (never together in training, in no evaluation role)."""
        pair = frozenset((a, b))
        for role, pairs in (
            ("train", self.train_pairs),
            ("validation", self.validation_pairs),
            ("test", self.test_pairs),
        ):
            if pair in {frozenset(p) for p in pairs}:
                return role
        return "heldout"

    @classmethod
    def from_dict(cls, data: dict) -> World:
        pairs = {key: tuple(tuple(p) for p in data.get(key, ())) for key in PAIR_LISTS}
        return cls(
            image_size=int(data["image_size"]),
            min_size=int(data["min_size"]),
            max_size=int(data["max_size"]),
            bar_ratio=float(data["bar_ratio"]),
            gap=int(data["gap"]),
            margin=int(data["margin"]),
            glyphs=tuple(
                Glyph(g["noun"], g["shape"], tuple(g["colour"]), float(g.get("frequency", 1.0))) for g in data["glyphs"]
            ),
            unseen_in_finetuning=tuple(data["unseen_in_finetuning"]),
            version=int(data.get("version", 1)),
            **pairs,
        )

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "image_size": self.image_size,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "bar_ratio": self.bar_ratio,
            "gap": self.gap,
            "margin": self.margin,
            "glyphs": [
                {"noun": g.noun, "shape": g.shape, "colour": list(g.colour), "frequency": g.frequency}
                for g in self.glyphs
            ],
            "unseen_in_finetuning": list(self.unseen_in_finetuning),
            **{key: [list(p) for p in getattr(self, key)] for key in PAIR_LISTS},
        }


PAIR_LISTS = ("train_pairs", "heldout_pairs", "validation_pairs", "test_pairs")


def load_world(path: str | Path = WORLD_FILE) -> World:
    return World.from_dict(json.loads(Path(path).read_text()))


def caption(nouns: tuple[str, ...] | list[str]) -> str:
    """'a moon' / 'a moon and a heart' / 'a moon, a heart and a star' (always "a": the article carries nothing)."""
    items = [f"a {n}" for n in nouns]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


@lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of a shape filling a width x height box, sampled at pixel centres."""
    u = (np.arange(width) + 0.5) / width * 2 - 1  # (W,) in (-1, 1), left to right
    v = (np.arange(height) + 0.5) / height * 2 - 1  # (H,) top to bottom
    v, u = np.meshgrid(v, u, indexing="ij")  # (H, W) each
    radius2, box = u**2 + v**2, np.maximum(abs(u), abs(v))
    masks = {
        "disc": radius2 <= 1,
        "square": box <= 1,
        "hbar": box <= 1,
        "vbar": box <= 1,
        "ring": (radius2 <= 1) & (radius2 >= RING_HOLE**2),
        "frame": box >= RING_HOLE,
        "tri_up": abs(u) <= (v + 1) / 2,
        "tri_down": abs(u) <= (1 - v) / 2,
        "tri_left": abs(v) <= (u + 1) / 2,
        "tri_right": abs(v) <= (1 - u) / 2,
        "plus": (abs(u) <= PLUS_ARM) | (abs(v) <= PLUS_ARM),
        "diamond": abs(u) + abs(v) <= 1,
    }
    mask = masks[shape]
    mask.setflags(write=False)  # cached: shared by every caller
    return mask


def glyph_box(world: World, shape: str, size: int) -> tuple[int, int]:
    """(width, height) of a glyph whose longer side is `size`."""
    short = max(2, round(size / world.bar_ratio))
    return {"hbar": (size, short), "vbar": (short, size)}.get(shape, (size, size))


@dataclass(frozen=True)
class PlacedObject:
    noun: str
    x: int  # left column of the box
    y: int  # top row of the box
    width: int
    height: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[PlacedObject, ...]

    @property
    def nouns(self) -> tuple[str, ...]:
        return tuple(o.noun for o in self.objects)

    @property
    def caption(self) -> str:
        return caption(self.nouns)


def _apart(a: PlacedObject, b: PlacedObject, gap: int) -> bool:
    return (
        a.x + a.width + gap <= b.x
        or b.x + b.width + gap <= a.x
        or a.y + a.height + gap <= b.y
        or b.y + b.height + gap <= a.y
    )


def sample_scene(world: World, nouns: tuple[str, ...] | list[str], rng: np.random.Generator) -> Scene:
    """Place the nouns (in caption order) at random non-overlapping positions with random sizes."""
    lo = world.margin
    for _ in range(200):
        placed: list[PlacedObject] = []
        for noun in nouns:
            size = int(rng.integers(world.min_size, world.max_size + 1))
            width, height = glyph_box(world, world.glyph(noun).shape, size)
            for _ in range(50):
                obj = PlacedObject(
                    noun,
                    int(rng.integers(lo, world.image_size - lo - width + 1)),
                    int(rng.integers(lo, world.image_size - lo - height + 1)),
                    width,
                    height,
                )
                if all(_apart(obj, other, world.gap) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == len(nouns):
            return Scene(tuple(placed))
    raise ValueError(f"cannot place {len(nouns)} objects on a {world.image_size}px canvas")


def render(world: World, scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8 image of the scene: flat glyph colours on black, no anti-aliasing."""
    image = np.zeros((world.image_size, world.image_size, 3), dtype=np.uint8)
    for obj in scene.objects:
        glyph = world.glyph(obj.noun)
        region = image[obj.y : obj.y + obj.height, obj.x : obj.x + obj.width]  # (h, w, 3) view
        region[shape_mask(glyph.shape, obj.width, obj.height)] = glyph.colour
    return image


def render_scene(world: World, nouns: tuple[str, ...] | list[str], seed: int) -> tuple[np.ndarray, Scene]:
    """The same (nouns, seed) always gives the same image."""
    scene = sample_scene(world, nouns, np.random.default_rng(seed))
    return render(world, scene), scene
