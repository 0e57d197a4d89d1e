"""Sampling matches diffusers' pipeline, is seeded per image, records per-object maps, and cancels."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sepen_core.config import MapConfig, SampleConfig
from sepen_core.errors import Canceled, ConceptError
from sepen_core.sampling import generate

PROMPT = "a photo of a cat and a dog"


def test_images_equal_stable_diffusion_pipeline(tiny_model):
    m = tiny_model
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=5, guidance_scale=6.0, num_images_per_prompt=2,
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np").images
    ours = generate(m, PROMPT, SampleConfig(num_inference_steps=5, num_images=2, seed=3))
    assert np.abs(theirs - ours.pixels.permute(0, 2, 3, 1).numpy()).max() < 1e-5
    assert ours.seeds == [3, 4] and ours.images[0].size == (64, 64)


def test_each_image_is_reproducible_from_its_own_seed(tiny_model):
    batch = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, num_images=3, seed=10))
    third = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, num_images=1, seed=12))
    assert torch.allclose(batch.pixels[2], third.pixels[0], atol=1e-5)
    assert not torch.allclose(batch.pixels[0], batch.pixels[1], atol=1e-3)


def test_maps_and_scores_of_the_conditional_branch(tiny_model):
    result = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, num_images=2, maps=MapConfig(normalization="content")),
                      concepts=["cat", "dog"])
    assert result.maps.shape == (2, 2, 8, 8)
    assert 0 < result.maps.max() <= 1
    score = result.scores[0]
    assert set(score.peaks) == {"cat", "dog"} and set(score.overlaps) == {"cat & dog"}
    assert score.min_peak == min(score.peaks.values())
    heatmap = result.heatmap(1)
    assert heatmap.size[0] == 3 * 64  # image + one panel per concept
    unguided = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, guidance_scale=1.0), concepts=["cat", "dog"])
    assert unguided.maps.shape == (1, 2, 8, 8)


def test_missing_concept_is_refused_before_sampling(tiny_model):
    with pytest.raises(ConceptError, match="'horse'"):
        generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=2), concepts=["cat", "horse"],
                 on_step=lambda i, n: pytest.fail("sampled"))


def test_cancel_between_steps(tiny_model):
    steps = []
    with pytest.raises(Canceled) as info:
        generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=10), on_step=lambda i, n: steps.append(i),
                 should_cancel=lambda: len(steps) >= 2)
    assert info.value.step == 2 and steps == [1, 2]
