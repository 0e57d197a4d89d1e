"""The fixed 220-concept large-scale collection: counts, uniqueness, no nested names, clean CLIP tokenisation."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CONCEPTS_PATH = ROOT / "sepen_core" / "data" / "large_scale_concepts.json"
TOKENIZER_PATH = ROOT / "sepen_core" / "clip_tokenizer"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def concepts():
    with open(CONCEPTS_PATH, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def all_names(concepts):
    return [name for split in ("seen", "held_out") for kind in ("animals", "objects") for name in concepts[split][kind]]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_PATH))


def test_structure_and_counts(concepts):
    assert set(concepts) == {"description", "seen", "held_out"}
    assert isinstance(concepts["description"], str) and concepts["description"].strip()
    assert "\n" not in concepts["description"]
    assert set(concepts["seen"]) == {"animals", "objects"}
    assert set(concepts["held_out"]) == {"animals", "objects"}
    assert len(concepts["seen"]["animals"]) == 100
    assert len(concepts["seen"]["objects"]) == 100
    assert len(concepts["held_out"]["animals"]) == 10
    assert len(concepts["held_out"]["objects"]) == 10


def test_names_are_lowercase_one_or_two_words(all_names):
    for name in all_names:
        assert isinstance(name, str)
        assert re.fullmatch(r"[a-z]+( [a-z]+)?", name), name


def test_all_names_distinct(all_names):
    assert len(all_names) == 220
    assert len(set(all_names)) == 220


def test_held_out_disjoint_from_seen(concepts):
    seen = set(concepts["seen"]["animals"]) | set(concepts["seen"]["objects"])
    held_out = set(concepts["held_out"]["animals"]) | set(concepts["held_out"]["objects"])
    assert not seen & held_out
    # held-out names are not plural forms of seen ones (nor vice versa)
    for a in held_out:
        for b in seen:
            assert a not in (b + "s", b + "es") and b not in (a + "s", a + "es"), (a, b)


def test_no_name_is_whole_word_part_of_another(all_names):
    nested = [(a, b) for a in all_names for b in all_names if a != b and re.search(r"\b" + re.escape(a) + r"\b", b)]
    assert not nested, nested


def test_clip_tokenisation(all_names, tokenizer):
    token_ids = {}
    for name in all_names:
        ids = tokenizer(name, add_special_tokens=False).input_ids
        assert 1 <= len(ids) <= MAX_TOKENS, (name, ids)
        assert tokenizer.decode(ids) == name, (name, tokenizer.decode(ids))
        token_ids[name] = ids

    def contains(haystack, needle):
        n = len(needle)
        return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))

    # each name is a contiguous token span of a two-concept prompt
    for i, a in enumerate(all_names):
        b = all_names[(i + 1) % len(all_names)]
        prompt_ids = tokenizer(f"a photo of a {a} and a {b}").input_ids
        assert contains(prompt_ids, token_ids[a]), (a, b)
        assert contains(prompt_ids, token_ids[b]), (a, b)

    # no name's token sequence sits inside another's (e.g. "boat" in "sailboat")
    nested = [(a, b) for a in all_names for b in all_names if a != b and contains(token_ids[b], token_ids[a])]
    assert not nested, nested
