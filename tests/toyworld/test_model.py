"""The toy base model: layout, conditioning and save/load."""

import pytest
import torch

from sepen_core.attention import map_layers
from sepen_core.config import SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.models import load_base_model
from sepen_core.sampling import generate
from toyworld.model import build_toy_model, trainable_conditioning


@pytest.fixture(scope="module")
def toy_model():
    return build_toy_model(seed=0)


def test_layout_pixel_space_and_map_layers(toy_model):
    assert toy_model.vae is None and toy_model.mask_padding and toy_model.tokenizer.model_max_length == 16
    assert toy_model.unet.config.in_channels == 3 and toy_model.scheduler.config.prediction_type == "v_prediction"
    assert (
        len(map_layers(toy_model.unet, toy_model.defaults.maps["map_downsample"])) == 3
    )  # 16x16: down_blocks.1, up_blocks.1 (x2)
    assert len(map_layers(toy_model.unet, 4)) == 4  # 8x8: down_blocks.2, mid_block, up_blocks.0 (x2)
    with pytest.raises(ConfigError):
        map_layers(toy_model.unet, 1)
    assert sum(p.numel() for p in toy_model.unet.parameters()) < 2_000_000


def test_training_conditioning_is_what_sampling_sees(toy_model):
    prompts = ["a cherry and a box", "a star", ""]
    trained = trainable_conditioning(toy_model, prompts)
    sampled = toy_model.encode_prompts(prompts)
    assert torch.equal(trained.input_ids, sampled.input_ids) and trained.input_ids.shape == (3, 16)
    assert torch.equal(trained.encoder_attention_mask, sampled.encoder_attention_mask)
    assert torch.allclose(trained.encoder_hidden_states, sampled.encoder_hidden_states)
    assert trained.encoder_attention_mask[0].tolist()[:8] == [0, 1, 1, 1, 1, 1, 1, 0]  # a cherry and a box <end>
    assert trained.encoder_attention_mask[2].tolist()[:3] == [0, 1, 0]  # the empty prompt keeps its end token


def test_save_and_load_round_trip(toy_model, tmp_path):
    toy_model.save_pretrained(tmp_path / "model")
    loaded = load_base_model(tmp_path / "model")
    assert loaded.mask_padding and loaded.vae is None and loaded.tokenizer.model_max_length == 16
    assert loaded.base_fingerprint == toy_model.base_fingerprint
    config = SampleConfig(num_inference_steps=3, guidance_scale=3.0, num_images=2, seed=5)
    a = generate(toy_model, "a cherry and a box", config).pixels
    b = generate(loaded, "a cherry and a box", config).pixels
    assert a.shape == (2, 3, 32, 32) and torch.allclose(a, b, atol=1e-5)
