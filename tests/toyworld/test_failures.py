"""Failure kinds of multi-object images, on hand-made scenes whose answer is known."""

from pathlib import Path

import numpy as np

from toyworld.detector import find_candidates
from toyworld.failures import count_kinds, failure_kinds
from toyworld.world import PlacedObject, Scene, load_world, render

WORLD = load_world(Path(__file__).parents[2] / "toyworld" / "world-v2.json")


def scene(*objects: tuple[str, int, int, int, int]) -> np.ndarray:
    return render(WORLD, Scene(tuple(PlacedObject(*o) for o in objects)))


def test_success_has_no_failure():
    image = scene(("cherry", 2, 2, 9, 9), ("bus", 16, 16, 10, 4))
    assert failure_kinds(find_candidates(WORLD, image), ("cherry", "bus")) == {}


def test_absent_twice_wrong_shape_and_fused():
    only_cherry = scene(("cherry", 2, 2, 9, 9))
    assert failure_kinds(find_candidates(WORLD, only_cherry), ("cherry", "bus")) == {"bus": "absent"}
    two_cherries = scene(("cherry", 2, 2, 9, 9), ("cherry", 18, 18, 9, 9))
    assert failure_kinds(find_candidates(WORLD, two_cherries), ("cherry", "bus")) == {"bus": "twice"}
    blue_disc = scene(("cherry", 2, 2, 9, 9), ("planet", 18, 18, 9, 9))  # bus is a blue bar; planet a blue disc
    assert failure_kinds(find_candidates(WORLD, blue_disc), ("cherry", "bus")) == {"bus": "wrong_shape"}
    glued = scene(("cherry", 2, 2, 9, 9))
    glued[2:11, 11:14] = WORLD.glyph("planet").colour  # a blue square block touching the cherry: not a bus
    assert failure_kinds(find_candidates(WORLD, glued), ("cherry", "bus")) == {"bus": "fused"}


def test_count_kinds():
    assert count_kinds([{"bus": "absent"}, {}, {"a": "twice", "b": "absent"}]) == {
        "absent": 2,
        "wrong_shape": 0,
        "fused": 0,
        "twice": 1,
    }


def test_audit_sheet_labels_each_generated_image():
    from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
    from toyworld.audit import CELL, LABEL, audit_sheet

    world = load_world(BUNDLED_MODEL_DIR / "world.json")
    sheet = audit_sheet(load_base_model(BUNDLED_MODEL_DIR), world, images=3, columns=2, group="validation")
    assert sheet.size == (2 * CELL, 2 * (CELL + 2 * LABEL))
    first_cell = np.asarray(sheet.crop((0, LABEL, CELL, LABEL + CELL)))
    assert first_cell.max() > 200  # a drawn glyph, not an empty cell
