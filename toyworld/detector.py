"""A programmatic object detector for the toy world: palette colour -> connected components -> shape -> noun.

A pixel takes the nearest glyph colour when it lies within `max_colour_distance` (RGB, 0..255) of it
(the palette's colours are at least 127 apart; dark edge pixels and black stay background). Each
4-connected component of one colour with at least `min_area` pixels is an object candidate; its shape
is the world's glyph shape whose mask, drawn into the component's bounding box, has the highest IoU
with it (bars are told from compact shapes by the box's aspect ratio first). A candidate is a detection
of the noun that has its colour and its shape (world v2 draws two nouns in each colour: a disc, a bar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from toyworld.world import SHAPES, World, shape_mask

MAX_COLOUR_DISTANCE = 64.0
MIN_AREA = 12
BAR_ASPECT = 1.6  # box aspect (long / short) above which a component is a bar


@dataclass(frozen=True)
class Candidate:
    """One connected component of a glyph colour."""

    colour_nouns: tuple[str, ...]  # the nouns drawn in its colour (one in world v1, a disc and a bar in v2)
    shape: str  # the best-matching glyph shape
    shape_iou: float  # IoU of the component with that shape's mask in its box
    area: int
    box: tuple[int, int, int, int]  # x, y, width, height
    noun: str | None  # the noun of this colour and shape, if there is one: a detection


def to_rgb_array(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor in [0, 1] -> (H, W, 3) float array in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255  # (3, H, W) -> (H, W, 3)
    return np.asarray(image, dtype=np.float32)


def palette(world: World) -> list[tuple[int, int, int]]:
    """The world's distinct glyph colours, in glyph order."""
    return list(dict.fromkeys(g.colour for g in world.glyphs))


def colour_labels(world: World, rgb: np.ndarray, max_distance: float = MAX_COLOUR_DISTANCE) -> np.ndarray:
    """(H, W) index of each pixel's colour in palette(world), or -1 (background or no palette colour)."""
    palette_rgb = np.array(palette(world), dtype=np.float32)  # (K, 3)
    distance = np.linalg.norm(rgb[:, :, None, :] - palette_rgb[None, None], axis=-1)  # (H, W, K)
    nearest = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= max_distance, nearest, -1)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a (H, W) bool mask, each as an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    components = []
    for start in zip(*np.nonzero(mask), strict=False):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        components.append(np.array(pixels))
    return components


def classify_shape(component: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> tuple[str, float]:
    """(n, 2) pixel coordinates -> (best of `shapes`, its IoU) against each shape drawn into the same box.

    A bar's box decides by its aspect alone; a component whose box fits no allowed shape keeps its box's
    kind ("hbar", "vbar") or the best compact shape of all, so it is never read as a world's noun."""
    top, left = component.min(axis=0)
    height, width = component.max(axis=0) - (top, left) + 1
    mask = np.zeros((height, width), dtype=bool)
    mask[component[:, 0] - top, component[:, 1] - left] = True
    aspect = width / height
    if aspect >= BAR_ASPECT:
        shapes = ("hbar",)
    elif aspect <= 1 / BAR_ASPECT:
        shapes = ("vbar",)
    else:
        shapes = tuple(s for s in shapes if s not in ("hbar", "vbar")) or tuple(
            s for s in SHAPES if s not in ("hbar", "vbar")
        )
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        template = shape_mask(shape, int(width), int(height))
        iou = float((template & mask).sum() / (template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def find_candidates(
    world: World, image, *, max_colour_distance: float = MAX_COLOUR_DISTANCE, min_area: int = MIN_AREA
) -> list[Candidate]:
    """Every component of a glyph colour with at least min_area pixels, largest first."""
    labels = colour_labels(world, to_rgb_array(image), max_colour_distance)
    world_shapes = tuple(dict.fromkeys(g.shape for g in world.glyphs))
    candidates = []
    for k, colour in enumerate(palette(world)):
        nouns = tuple(g.noun for g in world.glyphs if g.colour == colour)
        for component in connected_components(labels == k):
            if len(component) < min_area:
                continue
            shape, iou = classify_shape(component, world_shapes)
            top, left = component.min(axis=0)
            bottom, right = component.max(axis=0)
            noun = next((n for n in nouns if world.glyph(n).shape == shape), None)
            candidates.append(
                Candidate(
                    nouns,
                    shape,
                    iou,
                    len(component),
                    (int(left), int(top), int(right - left + 1), int(bottom - top + 1)),
                    noun,
                )
            )
    return sorted(candidates, key=lambda c: -c.area)


def detect(world: World, image, **kwargs) -> list[str]:
    """The nouns detected in an image (one entry per object, so a noun drawn twice appears twice), sorted."""
    return detections(find_candidates(world, image, **kwargs))


def detections(candidates: list[Candidate]) -> list[str]:
    """The detected nouns among candidates, sorted (one entry per object)."""
    return sorted(c.noun for c in candidates if c.noun is not None)


def object_success(detected: list[str], named: tuple[str, ...] | list[str]) -> bool:
    """Every named noun is detected at least once (single object: the named object is detected).
    Extra objects do not count against it; `exact_success` is the strict variant."""
    return set(named) <= set(detected)


def exact_success(detected: list[str], named: tuple[str, ...] | list[str]) -> bool:
    """Exactly the named objects, each once, and nothing else detected."""
    return sorted(detected) == sorted(named)
