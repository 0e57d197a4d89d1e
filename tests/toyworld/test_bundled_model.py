"""The bundled toy-world model (world v2's base model) loads offline and draws the object a prompt names (at
guidance 1.0, as its evaluation found), as the detector judges; the CLI and the worker find it by name."""

import torch

from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
from sepen_core.sampling import generate
from toyworld.detector import detect
from toyworld.world import load_world


def test_bundled_model_draws_the_named_single_objects():
    torch.set_num_threads(1)
    model = load_base_model(BUNDLED_MODEL_DIR)
    assert model.mask_padding and model.tokenizer.model_max_length == 16 and model.vae is None
    sample = model.defaults.sample_config()  # what the service and the CLI use where a request is silent
    assert (sample.guidance_scale, sample.num_inference_steps, sample.maps.map_downsample) == (1.0, 20, 2)
    world = load_world(BUNDLED_MODEL_DIR / "world.json")
    assert len(world.nouns) == 24 and world.test_pairs
    hits = 0
    for i, noun in enumerate(world.nouns):
        result = generate(model, f"a {noun}", model.defaults.sample_config({"seed": 100 + i}), concepts=[noun])
        assert result.maps.shape == (1, 1, 16, 16)
        hits += noun in detect(world, result.images[0])
    # 99.2% [97.0, 99.8] on 240 samples in its evaluation (gates.json beside it); 24 here, so allow for noise.
    assert hits >= 22, f"{hits}/24 single objects drawn"
