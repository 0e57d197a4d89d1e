"""Locate concepts in a tokenised prompt (METHOD.md section 7) and build the token masks that
turn per-token attention into per-object maps.

Positions count in the tokenised prompt (start token at 0), never in `prompt.split()` words; a
multi-token concept ("hippo|potam|us") owns all its sub-tokens, and its map is their sum.
"""

from __future__ import annotations

import torch

from sepen_core.errors import ConceptError


def locate_concepts(tokenizer, prompt: str, concepts: list[str] | tuple[str, ...]) -> list[tuple[int, ...]]:
    """Token positions of each concept in `prompt`, in the order the concepts are given.

    Longer concepts are placed first so that "hot dog" and "dog" in one prompt get different
    tokens; a concept found twice takes its first free occurrence. Raises ConceptError naming the
    concept when it is absent or cut off by the tokenizer's length limit (77 in SD).
    """
    full_ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    # The last kept position belongs to the end token, so content tokens must lie before it.
    limit = tokenizer.model_max_length - 1
    taken: set[int] = set()
    found: dict[int, tuple[int, ...]] = {}
    pieces = [tokenizer(c, add_special_tokens=False).input_ids for c in concepts]
    for i in sorted(range(len(concepts)), key=lambda i: -len(pieces[i])):
        sub = pieces[i]
        if not sub:
            raise ConceptError(concepts[i], prompt, "has no tokens")
        starts = [s for s in range(1, len(full_ids) - len(sub) + 1) if full_ids[s : s + len(sub)] == sub]
        free = [s for s in starts if not taken.intersection(range(s, s + len(sub)))]
        if not free:
            raise ConceptError(concepts[i], prompt, "does not appear in the prompt as a whole word sequence")
        start = free[0]
        if start + len(sub) > limit:
            raise ConceptError(
                concepts[i], prompt, f"is cut off by the {tokenizer.model_max_length}-token limit; shorten the prompt"
            )
        found[i] = tuple(range(start, start + len(sub)))
        taken.update(found[i])
    return [found[i] for i in range(len(concepts))]


def concept_token_mask(positions: list[list[tuple[int, ...]]], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample concept masks for a batch whose samples may name different numbers of objects.

    positions[b][k] holds the token positions of object k of sample b.
    Returns mask (B, K, T) with 1 on each object's sub-tokens, and valid (B, K) marking real
    objects (K is the largest object count; shorter samples are padded with empty rows).
    """
    batch = len(positions)
    objects = max(len(p) for p in positions)
    mask = torch.zeros(batch, objects, num_tokens)
    valid = torch.zeros(batch, objects, dtype=torch.bool)
    for b, sample in enumerate(positions):
        for k, tokens in enumerate(sample):
            mask[b, k, list(tokens)] = 1.0
            valid[b, k] = True
    return mask, valid


def content_token_mask(input_ids: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """(B, T) mask of each prompt's content tokens: after the start token, before the first end token."""
    positions = torch.arange(input_ids.shape[1])
    is_end = input_ids == end_token_id
    first_end = torch.where(
        is_end.any(dim=1), is_end.float().argmax(dim=1), torch.full((input_ids.shape[0],), input_ids.shape[1])
    )
    return ((positions[None, :] >= 1) & (positions[None, :] < first_end[:, None])).float()
