"""Base models load offline from diffusers directories, keep their base keys, and fail clearly."""

import pytest
import torch

from sepen_core.errors import ModelLoadError
from sepen_core.models import build_tiny_model, load_base_model


def test_save_and_load_round_trip(tmp_path):
    model = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = load_base_model(tmp_path / "m")
    assert loaded.model_id == model.model_id == "sepen-tiny-random-3"
    assert loaded.base_fingerprint == model.base_fingerprint
    assert type(loaded.scheduler) is type(model.scheduler)
    assert loaded.tokenizer.model_max_length == 77
    a, b = dict(model.unet.named_parameters()), dict(loaded.unet.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    ids = loaded.encode_prompts(["a cat"]).input_ids
    assert ids[0, :3].tolist() == [49406, 320, 2368]


def test_fingerprint_is_the_same_in_fp16_and_differs_between_models():
    fp32 = build_tiny_model(seed=0)
    assert fp32.to(dtype=torch.float16).base_fingerprint == build_tiny_model(seed=0).base_fingerprint
    assert build_tiny_model(seed=1).base_fingerprint != fp32.base_fingerprint


def test_missing_or_incomplete_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="'text_encoder/' is missing"):
        load_base_model(tmp_path / "half")
