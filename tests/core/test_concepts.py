"""Concepts are located by token position, multi-token concepts own all their pieces, and errors name the concept."""

import pytest
import torch

from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.errors import ConceptError
from sepen_core.models import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_single_token_concepts(tokenizer):
    assert locate_concepts(tokenizer, "a photo of a cat and a dog", ["cat", "dog"]) == [(5,), (8,)]


def test_multi_token_concept_owns_every_piece(tokenizer):
    # <s> a hippo potam us and a dog </s>
    assert locate_concepts(tokenizer, "a hippopotamus and a dog", ["hippopotamus", "dog"]) == [(2, 3, 4), (7,)]


def test_positions_are_token_positions_not_word_positions(tokenizer):
    # "cat" is word 3 of "a, photo of cat" but token 5: <s>=0 a=1 ,=2 photo=3 of=4 cat=5
    assert locate_concepts(tokenizer, "a, photo of cat", ["cat"]) == [(5,)]


def test_longer_concept_claims_its_tokens_first(tokenizer):
    positions = locate_concepts(tokenizer, "a dog next to a hot dog", ["dog", "hot dog"])
    assert positions == [(2,), (6, 7)]


def test_missing_concept_is_an_error_naming_it(tokenizer):
    with pytest.raises(ConceptError, match="'zebra'") as info:
        locate_concepts(tokenizer, "a photo of a cat", ["cat", "zebra"])
    assert info.value.concept == "zebra"


def test_plural_does_not_match_singular(tokenizer):
    with pytest.raises(ConceptError, match="'cat'"):
        locate_concepts(tokenizer, "two cats", ["cat"])


def test_concept_cut_off_by_token_limit(tokenizer):
    prompt = "a photo of " + "a very " * 40 + "cat"
    with pytest.raises(ConceptError, match="77-token limit") as info:
        locate_concepts(tokenizer, prompt, ["photo", "cat"])
    assert info.value.concept == "cat"


def test_masks_for_samples_with_different_object_counts():
    mask, valid = concept_token_mask([[(2,), (5, 6)], [(1,), (3,), (4,)]], num_tokens=8)
    assert mask.shape == (2, 3, 8)
    assert mask[0, 1].nonzero().flatten().tolist() == [5, 6]
    assert mask[0, 2].sum() == 0
    assert valid.tolist() == [[True, True, False], [True, True, True]]


def test_content_mask_spans_start_to_first_end_token():
    ids = torch.tensor([[49406, 320, 2368, 49407, 49407], [49406, 320, 1125, 539, 49407]])
    assert content_token_mask(ids, 49407).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]
