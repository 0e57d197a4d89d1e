"""The toy world's judge for sepen_core.evaluation: its detector reads which objects an image holds, and its test
pairs are the prompts an adapter is evaluated on when none are given. A toy model names it in its model_index.json
(`"sepen_judge": "toyworld.judge:load"`), which toyworld/train.py writes beside world.json."""

from __future__ import annotations

import json
from pathlib import Path

from sepen_core.evaluation import EvaluationPrompt
from toyworld.detector import detect, object_success
from toyworld.world import World, caption, load_world

SPEC = "toyworld.judge:load"


class WorldJudge:
    """True when every named noun is detected in the image (extra objects do not count against it)."""

    def __init__(self, world: World):
        self.world = world

    def __call__(self, pixels, concepts: tuple[str, ...]) -> bool:
        return object_success(detect(self.world, pixels), concepts)

    def default_prompts(self) -> list[EvaluationPrompt]:
        """The world's test pairs (world v2), else its held-out pairs: each in one caption order."""
        pairs = self.world.test_pairs or self.world.heldout_pairs
        return [EvaluationPrompt(caption(pair), tuple(pair)) for pair in pairs]


def load(model_dir: Path) -> WorldJudge:
    """The judge of the toy model in model_dir (its world.json)."""
    return WorldJudge(load_world(Path(model_dir) / "world.json"))


def name_judge(model_dir: Path) -> None:
    """Write this judge into a saved toy model's model_index.json."""
    index_file = Path(model_dir) / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "sepen_judge": SPEC}, indent=2) + "\n")
