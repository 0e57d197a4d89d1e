"""Why a multi-object image failed: each missing noun's failure kind, read from the detector's candidates.

For a noun the prompt names and the detector did not find, in the order checked:

* ``twice``       another named noun was drawn two or more times (the model drew it in the missing one's place)
* ``fused``       a component of its colour touches a component of another named noun's colour (merged objects)
* ``wrong_shape`` its colour is there, as a component no named noun explains, in another shape (a misdrawn glyph)
* ``absent``      no trace of it: no component of its colour that is not another named noun's detection

Only ``absent`` is the neglect SepEn targets; ``wrong_shape`` is a glyph-quality failure (world v1's
main one), ``twice`` and ``fused`` are the paper's other compositional failures.
"""

from __future__ import annotations

from toyworld.detector import Candidate

KINDS = ("absent", "wrong_shape", "fused", "twice")


def _touching(a: Candidate, b: Candidate) -> bool:
    """Boxes that overlap or share an edge (1 px apart at most)."""
    ax, ay, aw, ah = a.box
    bx, by, bw, bh = b.box
    return ax <= bx + bw and bx <= ax + aw and ay <= by + bh and by <= ay + ah


def failure_kinds(candidates: list[Candidate], named: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{missing noun: its failure kind} for the named nouns the detector did not find (empty on success);
    candidates: the image's find_candidates()."""
    detected = [c.noun for c in candidates if c.noun is not None]
    kinds = {}
    for noun in dict.fromkeys(named):
        if noun in detected:
            continue
        others = [n for n in named if n != noun]
        if any(detected.count(n) >= 2 for n in others):
            kinds[noun] = "twice"
            continue
        mine = [c for c in candidates if noun in c.colour_nouns and c.noun not in others]
        theirs = [c for c in candidates if c.noun in others]
        if any(_touching(m, t) for m in mine for t in theirs):
            kinds[noun] = "fused"
        elif mine:
            kinds[noun] = "wrong_shape"
        else:
            kinds[noun] = "absent"
    return kinds


def count_kinds(failures: list[dict[str, str]]) -> dict[str, int]:
    """How many missing objects of each kind, over a list of failure_kinds() results."""
    counts = dict.fromkeys(KINDS, 0)
    for kinds in failures:
        for kind in kinds.values():
            counts[kind] += 1
    return counts
