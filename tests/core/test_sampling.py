"""Sampling matches diffusers' pipeline, is seeded per image, records per-object maps, and cancels; Attend-and-Excite
runs the same from a config's guidance_method as from its settings given, within its schedule's cost bound."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sepen_core.config import MapConfig, SampleConfig
from sepen_core.errors import Canceled, ConceptError, ConfigError
from sepen_core.sampling import generate

PROMPT = "a photo of a cat and a dog"


def test_images_equal_stable_diffusion_pipeline(tiny_model):
    m = tiny_model
    pipe = StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        tokenizer=m.tokenizer,
        unet=m.unet,
        scheduler=m.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT,
        num_inference_steps=5,
        guidance_scale=6.0,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="np",
    ).images
    ours = generate(m, PROMPT, SampleConfig(num_inference_steps=5, num_images=2, seed=3))
    assert np.abs(theirs - ours.pixels.permute(0, 2, 3, 1).numpy()).max() < 1e-5
    assert ours.seeds == [3, 4] and ours.images[0].size == (64, 64)


def test_each_image_is_reproducible_from_its_own_seed(tiny_model):
    batch = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, num_images=3, seed=10))
    third = generate(tiny_model, PROMPT, SampleConfig(num_inference_steps=3, num_images=1, seed=12))
    assert torch.allclose(batch.pixels[2], third.pixels[0], atol=1e-5)
    assert not torch.allclose(batch.pixels[0], batch.pixels[1], atol=1e-3)


def test_maps_and_scores_of_the_conditional_branch(tiny_model):
    content_maps = MapConfig(normalization="content")
    result = generate(
        tiny_model,
        PROMPT,
        SampleConfig(num_inference_steps=3, num_images=2, maps=content_maps),
        concepts=["cat", "dog"],
    )
    assert result.maps.shape == (2, 2, 8, 8)
    assert 0 < result.maps.max() <= 1
    score = result.scores[0]
    assert set(score.peaks) == {"cat", "dog"} and set(score.overlaps) == {"cat & dog"}
    assert score.min_peak == min(score.peaks.values())
    heatmap = result.heatmap(1)
    assert heatmap.size[0] == 3 * 128  # image + one panel per concept
    unguided = generate(
        tiny_model, PROMPT, SampleConfig(num_inference_steps=3, guidance_scale=1.0), concepts=["cat", "dog"]
    )
    assert unguided.maps.shape == (1, 2, 8, 8)


def test_each_denoising_step_has_its_own_scores(tiny_model):
    steps = 4
    result = generate(
        tiny_model, PROMPT, SampleConfig(num_inference_steps=steps, num_images=2), concepts=["cat", "dog"]
    )
    assert len(result.step_scores) == steps and all(len(per_image) == 2 for per_image in result.step_scores)
    assert all(set(s.peaks) == {"cat", "dog"} for per_image in result.step_scores for s in per_image)
    first, last = result.step_scores[0][0], result.step_scores[-1][0]
    assert first.peaks != last.peaks  # the maps change along the trajectory


def test_missing_concept_is_refused_before_sampling(tiny_model):
    with pytest.raises(ConceptError, match="'horse'"):
        generate(
            tiny_model,
            PROMPT,
            SampleConfig(num_inference_steps=2),
            concepts=["cat", "horse"],
            on_step=lambda i, n: pytest.fail("sampled"),
        )


def test_cancel_between_steps(tiny_model):
    steps = []
    with pytest.raises(Canceled) as info:
        generate(
            tiny_model,
            PROMPT,
            SampleConfig(num_inference_steps=10),
            on_step=lambda i, n: steps.append(i),
            should_cancel=lambda: len(steps) >= 2,
        )
    assert info.value.step == 2 and steps == [1, 2]


def test_attend_and_excite_lifts_the_weakest_object_at_test_time(tiny_model):
    from sepen_core.attend_excite import AttendExcite, AttendExciteConfig
    from sepen_core.attention import map_targets

    config = SampleConfig(num_inference_steps=4, num_images=2, maps=MapConfig(normalization="content"))
    strong = AttendExciteConfig(scale_factor=2000.0)  # the random tiny model's maps barely react to the published step
    base = generate(tiny_model, PROMPT, config, concepts=["cat", "dog"])
    excited = generate(tiny_model, PROMPT, config, concepts=["cat", "dog"], attend_excite=strong)
    assert all(e.min_peak > b.min_peak for e, b in zip(excited.scores, base.scores, strict=True))
    assert (excited.pixels - base.pixels).abs().max() > 1e-3

    # One update moves the latents up A&E's own objective.
    cond = tiny_model.encode_prompts([PROMPT])
    targets = map_targets(tiny_model, cond, [["cat", "dog"]], map_downsample=4, latent_size=(32, 32))
    excite = AttendExcite(strong, tiny_model.unet, cond, targets, num_steps=50)
    latents, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor(900)
    with torch.no_grad():
        before = excite.peaks(latents, t).min()
        after = excite.peaks(excite.update(latents, 1, t), t).min()
    assert after > before and excite.updates == 1
    with pytest.raises(ConfigError, match="concepts"):
        generate(tiny_model, PROMPT, config, attend_excite=strong)


def test_attend_and_excite_by_config_is_attend_and_excite_by_argument(tiny_model):
    """guidance_method "attend-excite" with excite_scale runs the same A&E as the explicit AttendExciteConfig argument
    (published schedule, that scale factor); both results' configs and PNG metadata say so; it needs concepts."""
    from sepen_core.attend_excite import AttendExciteConfig

    plain = SampleConfig(num_inference_steps=4, num_images=2, maps=MapConfig(normalization="content"))
    by_config = dataclasses.replace(plain, guidance_method="attend-excite", excite_scale=2000.0)
    configured = generate(tiny_model, PROMPT, by_config, concepts=["cat", "dog"])
    argued = generate(
        tiny_model, PROMPT, plain, concepts=["cat", "dog"], attend_excite=AttendExciteConfig(scale_factor=2000.0)
    )
    base = generate(tiny_model, PROMPT, plain, concepts=["cat", "dog"])
    assert torch.equal(configured.pixels, argued.pixels)
    assert (configured.pixels - base.pixels).abs().max() > 1e-3
    assert configured.config == argued.config == by_config
    metadata = configured.image_metadata(0)
    assert metadata["guidance_method"] == "attend-excite" and metadata["excite_scale"] == "2000.0"
    assert "Attend-and-Excite scale: 2000.0" in metadata["parameters"]
    assert base.image_metadata(0)["guidance_method"] == "none" and "excite_scale" not in base.image_metadata(0)
    with pytest.raises(ConfigError) as info:
        generate(tiny_model, PROMPT, by_config)
    assert info.value.field == "concepts" and "concepts" in str(info.value)


def test_attend_and_excite_stays_within_its_cost_bound(tiny_model, monkeypatch):
    """The gradient evaluations a run makes never pass the schedule's bound that GET /models' cost rests on."""
    from sepen_core import sampling
    from sepen_core.config import attend_excite_evaluations

    made = []

    class Counting(sampling.AttendExcite):
        def _loss_gradient(self, latents, t, rows=None):
            made.append(1)
            return super()._loss_gradient(latents, t, rows)

    monkeypatch.setattr(sampling, "AttendExcite", Counting)
    config = SampleConfig(num_inference_steps=5, guidance_method="attend-excite", excite_scale=50.0)
    generate(tiny_model, PROMPT, config, concepts=["cat", "dog"])
    assert 2 <= len(made) <= attend_excite_evaluations(5)  # one at each of the 2 altered steps, at least
