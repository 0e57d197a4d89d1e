"""Concept sets and the training prompts drawn from them (METHOD.md sections 4-6). Torch-free.

A ConceptSet is one of two modes:
* groups: explicit concept pairs (or larger groups), each trained with the group's templates;
* collection: many concepts; each sample pairs two distinct training concepts at random,
  with a fixed held-out list that never appears in finetuning.
Templates name their slots {A}, {B}, {C}...; a concept fills its slot verbatim.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from sepen_core.errors import ConfigError

SLOTS = string.ascii_uppercase
COLLECTION_TEMPLATES = ("a photo of a {A} and a {B}", "a photo of a {A} with a {B}")
PRIOR_TEMPLATE = "a photo of a {A}"
LARGE_SCALE_CONCEPTS = Path(__file__).parent / "data" / "large_scale_concepts.json"

_FORMATTER = string.Formatter()
_MAX_GROUP = 8


def default_group_template(size: int) -> str:
    """'a photo of a {A} and a {B}', 'a photo of a {A}, a {B} and a {C}', ..."""
    slots = [f"a {{{SLOTS[i]}}}" for i in range(size)]
    return "a photo of " + ", ".join(slots[:-1]) + " and " + slots[-1]


def template_slots(template: str) -> int:
    """Number of concept slots in a template; its slots must be exactly {A}..{X}, each once. Parsed as
    str.format (fill_template) parses it, so a stray brace or a format spec fails here, not while training."""
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in _FORMATTER.parse(template) if name is not None
        ]
    except ValueError:  # a single '{' or '}'
        fields = []
    found = [name for name, spec, conversion in fields if not spec and conversion is None]
    n = len(found)
    if n < 1 or len(fields) != n or sorted(found) != list(SLOTS[:n]):
        raise ConfigError(
            "templates",
            f"template {template[:80]!r} must name its slots {{A}}, {{B}}, ... each once, in any order, "
            "with no stray braces",
        )
    return n


def fill_template(template: str, concepts: tuple[str, ...]) -> str:
    return template.format(**{SLOTS[i]: c for i, c in enumerate(concepts)})


def _check_concept(name: str, field: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(field, "every concept must be a non-empty string")
    if len(name) > 100 or "{" in name or "}" in name:
        raise ConfigError(field, f"concept {name[:40]!r} must be at most 100 characters with no braces")
    return name.strip()


@dataclass(frozen=True)
class TrainingPrompt:
    """One training sample's text: the multi-object prompt, its concepts, and a single-object prompt."""

    prompt: str
    concepts: tuple[str, ...]
    prior_prompt: str


@dataclass(frozen=True)
class ConceptSet:
    groups: tuple[tuple[str, ...], ...] = ()
    collection: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    prior_template: str = PRIOR_TEMPLATE

    def __post_init__(self):
        groups = tuple(tuple(_check_concept(c, "groups") for c in g) for g in self.groups)
        collection = tuple(_check_concept(c, "collection") for c in self.collection)
        held_out = tuple(_check_concept(c, "held_out") for c in self.held_out)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "collection", collection)
        object.__setattr__(self, "held_out", held_out)
        object.__setattr__(self, "templates", tuple(self.templates))
        if bool(groups) == bool(collection):
            raise ConfigError(
                "concepts", "give either groups (concept pairs) or a collection, not both and not neither"
            )
        if template_slots(self.prior_template) != 1:
            raise ConfigError("prior_template", "must have exactly one slot, {A}")
        for t in self.templates:
            template_slots(t)
        if groups:
            if held_out:
                raise ConfigError("held_out", "held-out concepts only apply to a collection")
            for g in groups:
                if not 2 <= len(g) <= _MAX_GROUP:
                    raise ConfigError("groups", f"group {list(g)} must have 2 to {_MAX_GROUP} concepts")
                if len(set(g)) != len(g):
                    raise ConfigError("groups", f"group {list(g)} repeats a concept")
                if self.templates and not self.templates_for(len(g)):
                    raise ConfigError("templates", f"no template has {len(g)} slots for group {list(g)}")
        else:
            if len(set(collection)) != len(collection):
                raise ConfigError("collection", "a concept appears twice")
            missing = [c for c in held_out if c not in collection]
            if missing:
                raise ConfigError(
                    "held_out", f"{missing[0]!r} is not in the collection; held-out concepts must be listed in it"
                )
            if len(self.training_concepts) < 2:
                raise ConfigError("collection", "needs at least 2 concepts that are not held out")
            if self.templates and not self.templates_for(2):
                raise ConfigError("templates", "a collection needs templates with exactly two slots, {A} and {B}")

    @classmethod
    def pairs(cls, *groups: tuple[str, ...] | list[str], templates: tuple[str, ...] = ()) -> ConceptSet:
        return cls(groups=tuple(tuple(g) for g in groups), templates=tuple(templates))

    @classmethod
    def large_scale(cls, path: Path = LARGE_SCALE_CONCEPTS, templates: tuple[str, ...] = ()) -> ConceptSet:
        """The project's fixed 220-concept collection (100+100 seen, 10+10 held out)."""
        data = json.loads(Path(path).read_text())
        seen = [c for kind in ("animals", "objects") for c in data["seen"][kind]]
        held = [c for kind in ("animals", "objects") for c in data["held_out"][kind]]
        return cls(collection=tuple(seen + held), held_out=tuple(held), templates=tuple(templates))

    @property
    def mode(self) -> str:
        return "groups" if self.groups else "collection"

    @property
    def training_concepts(self) -> tuple[str, ...]:
        if self.groups:
            return tuple(dict.fromkeys(c for g in self.groups for c in g))
        held = set(self.held_out)
        return tuple(c for c in self.collection if c not in held)

    def templates_for(self, size: int) -> tuple[str, ...]:
        if self.templates:
            return tuple(t for t in self.templates if template_slots(t) == size)
        return COLLECTION_TEMPLATES if self.collection else (default_group_template(size),)

    def sample(self, rng: random.Random) -> TrainingPrompt:
        """Draw one training prompt: a group (or a random distinct pair) in a random template."""
        if self.groups:
            concepts = self.groups[rng.randrange(len(self.groups))]
        else:
            pool = self.training_concepts
            concepts = tuple(rng.sample(pool, 2))
        template = rng.choice(self.templates_for(len(concepts)))
        single = concepts[rng.randrange(len(concepts))]
        return TrainingPrompt(
            fill_template(template, concepts), concepts, fill_template(self.prior_template, (single,))
        )

    def to_dict(self) -> dict:
        return {
            "groups": [list(g) for g in self.groups],
            "collection": list(self.collection),
            "held_out": list(self.held_out),
            "templates": list(self.templates),
            "prior_template": self.prior_template,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConceptSet:
        return cls(
            groups=tuple(tuple(g) for g in data.get("groups", ())),
            collection=tuple(data.get("collection", ())),
            held_out=tuple(data.get("held_out", ())),
            templates=tuple(data.get("templates", ())),
            prior_template=data.get("prior_template", PRIOR_TEMPLATE),
        )
