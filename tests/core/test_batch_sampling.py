"""Batched sampling: requests with different adapters, prompts, seeds and guidance share one UNet batch and each
gets the images it gets alone; requests that cannot share a batch (Attend-and-Excite's among them) are refused by
name."""

import dataclasses

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExciteConfig
from sepen_core.config import MapConfig, SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.models import build_tiny_model
from sepen_core.sampling import GenerationRequest, batch_key, generate, generate_batch

# The stated tolerance: a request's pixels in a batch vs alone ([0, 1] scale; float32 on the CPU).
TOLERANCE = 1e-5


def random_adapter(model, seed: int, scale: float = 0.05) -> KeyProjectionAdapter:
    """An adapter whose key deltas are random, large enough to change the images visibly."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {
        name: (scale * base.float().std() * torch.randn(base.shape, generator=generator)).half()
        for name, base in model.base_keys.items()
    }
    return KeyProjectionAdapter(deltas, model.model_id, model.base_fingerprint, {"name": f"random-{seed}"})


def requests_of(model, concepts: tuple[str, ...] = ()) -> list[GenerationRequest]:
    first, second = random_adapter(model, 1), random_adapter(model, 2)
    steps = 4
    return [
        GenerationRequest(
            "a cat and a dog", SampleConfig(num_inference_steps=steps, num_images=2, seed=5), first, concepts
        ),
        GenerationRequest(
            "a dog and a cat",
            SampleConfig(
                num_inference_steps=steps, num_images=1, seed=40, guidance_scale=3.0, negative_prompt="blurry"
            ),
            None,
            concepts,
        ),
        GenerationRequest(
            "a cat and a dog", SampleConfig(num_inference_steps=steps, num_images=3, seed=7), second, concepts
        ),
        GenerationRequest(
            "a cat and a dog", SampleConfig(num_inference_steps=steps, num_images=1, seed=9), first, concepts
        ),
    ]


def alone(model, request: GenerationRequest):
    return generate(model, request.prompt, request.config, adapter=request.adapter, concepts=list(request.concepts))


def test_mixed_adapters_in_one_batch_give_each_request_its_own_images(tiny_model):
    requests = requests_of(tiny_model)
    before = {name: w.clone() for name, w in tiny_model.unet.state_dict().items() if "attn2.to_k" in name}
    batched = generate_batch(tiny_model, requests)
    assert [len(r.images) for r in batched] == [2, 1, 3, 1]
    for request, result in zip(requests, batched, strict=True):
        single = alone(tiny_model, request)
        assert result.seeds == single.seeds
        assert (result.pixels - single.pixels).abs().max() < TOLERANCE
        assert result.adapter_name == single.adapter_name and result.config == request.config
    # The adapters changed the images (so the test can fail), and the model's keys are as they were.
    plain = generate(tiny_model, requests[0].prompt, requests[0].config)
    assert (plain.pixels - batched[0].pixels).abs().max() > 100 * TOLERANCE
    after = {name: w for name, w in tiny_model.unet.state_dict().items() if "attn2.to_k" in name}
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_maps_and_scores_are_each_requests_own(tiny_model):
    requests = requests_of(tiny_model, concepts=("cat", "dog"))
    batched = generate_batch(tiny_model, requests)
    for request, result in zip(requests, batched, strict=True):
        single = alone(tiny_model, request)
        assert result.maps.shape == single.maps.shape
        assert (result.maps - single.maps).abs().max() < TOLERANCE
        assert len(result.step_scores) == request.config.num_inference_steps
        assert len(result.step_scores[0]) == request.config.num_images
        for ours, theirs in zip(result.scores, single.scores, strict=True):
            assert ours.min_peak == pytest.approx(theirs.min_peak, abs=TOLERANCE)


def test_a_stochastic_scheduler_draws_each_requests_noise_from_its_own_seed():
    model = build_tiny_model(seed=0)
    model.scheduler = EulerAncestralDiscreteScheduler.from_config(model.scheduler.config)
    requests = requests_of(model)[:3]
    batched = generate_batch(model, requests)
    for request, result in zip(requests, batched, strict=True):
        assert (result.pixels - alone(model, request).pixels).abs().max() < TOLERANCE


def test_requests_that_cannot_share_a_batch_are_refused(tiny_model):
    base = GenerationRequest("a cat and a dog", SampleConfig(num_inference_steps=3))
    others = {
        "steps": dataclasses.replace(base, config=SampleConfig(num_inference_steps=4)),
        "size": dataclasses.replace(base, config=SampleConfig(num_inference_steps=3, height=128, width=128)),
        "guidance off": dataclasses.replace(base, config=SampleConfig(num_inference_steps=3, guidance_scale=1.0)),
        "maps": dataclasses.replace(base, concepts=("cat", "dog")),
    }
    recorded = dataclasses.replace(base, concepts=("cat", "dog"))
    other_maps = dataclasses.replace(
        recorded, config=SampleConfig(num_inference_steps=3, maps=MapConfig(normalization="content"))
    )
    for other in [*others.values(), other_maps]:
        left = recorded if other is other_maps else base
        assert batch_key(tiny_model, left) != batch_key(tiny_model, other)
        with pytest.raises(ConfigError) as caught:
            generate_batch(tiny_model, [left, other])
        assert caught.value.field == "requests"
    # What may differ: prompt, seed, negative prompt, guidance scale, adapter.
    similar = GenerationRequest(
        "a dog", SampleConfig(num_inference_steps=3, seed=4, negative_prompt="x", guidance_scale=9.0)
    )
    assert batch_key(tiny_model, base) == batch_key(tiny_model, similar)


def test_attend_and_excite_takes_one_request(tiny_model):
    requests = requests_of(tiny_model, concepts=("cat", "dog"))[:2]
    with pytest.raises(ConfigError):
        generate_batch(tiny_model, requests, attend_excite=AttendExciteConfig())
    assert generate_batch(tiny_model, []) == []


def test_attend_and_excite_requests_are_sampled_alone(tiny_model):
    """A request with guidance_method attend-excite has a batch key of its own: never batched with another A&E request
    or a plain one, and generate_batch refuses such a batch by the field's name."""
    plain = GenerationRequest("a cat and a dog", SampleConfig(num_inference_steps=3), None, ("cat", "dog"))
    excited = dataclasses.replace(plain, config=SampleConfig(num_inference_steps=3, guidance_method="attend-excite"))
    other = dataclasses.replace(excited, prompt="a dog and a cat")
    keys = {batch_key(tiny_model, r) for r in (plain, excited, other)}
    assert len(keys) == 3 and batch_key(tiny_model, excited) == batch_key(tiny_model, excited)
    for pair in ([plain, excited], [excited, other]):
        with pytest.raises(ConfigError) as caught:
            generate_batch(tiny_model, pair)
        assert caught.value.field == "guidance_method"
