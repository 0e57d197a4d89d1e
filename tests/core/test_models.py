"""Base models load offline from diffusers directories, keep their base keys, and fail clearly."""

import pytest
import torch

from sepen_core.config import ModelDefaults
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
    with pytest.raises(ModelLoadError, match="lacks 'text_encoder/'; sepen supports"):
        load_base_model(tmp_path / "half")


def test_model_defaults_are_saved_with_the_model_and_checked_on_load(tmp_path):
    import json

    model = build_tiny_model(seed=0)
    model.defaults = ModelDefaults(
        sample={"guidance_scale": 1.0}, maps={"map_downsample": 2}, finetune={"learning_rate": 1e-3}
    )
    model.save_pretrained(tmp_path / "m")
    assert load_base_model(tmp_path / "m").defaults == model.defaults
    index_file = tmp_path / "m" / "model_index.json"
    index = json.loads(index_file.read_text())
    index["sepen_defaults"]["sample"]["guidance_scale"] = -2
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="sepen_defaults.guidance_scale: must be in"):
        load_base_model(tmp_path / "m")


def test_sd2_layout_loads_finetunes_and_samples(tmp_path):
    """SD 2.x differs by linear projections, per-block head counts, upcast attention, v-prediction, a '!' pad token."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sepen_core.config import FinetuneConfig, SampleConfig
    from sepen_core.finetuning import finetune
    from sepen_core.models import BaseModel, load_clip_tokenizer, tiny_unet_config
    from sepen_core.prompts import ConceptSet
    from sepen_core.sampling import generate

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{
            **tiny_unet_config(),
            "use_linear_projection": True,
            "upcast_attention": True,
            "attention_head_dim": (2, 4, 8, 8),
        }
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu",
            pad_token_id=1,
        )
    )
    tokenizer = load_clip_tokenizer()
    tokenizer.pad_token = "!"
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    BaseModel(unet, text, tokenizer, scheduler, None, "tiny-sd2").save_pretrained(tmp_path / "sd2")

    model = load_base_model(tmp_path / "sd2")
    assert model.vae is None and model.scheduler.config.prediction_type == "v_prediction"
    assert model.tokenizer.pad_token == "!" and model.noise_scheduler.config.prediction_type == "v_prediction"
    result = finetune(
        model, ConceptSet.pairs(("cat", "dog")), FinetuneConfig(steps=2, batch_size=2, learning_rate=1e-2)
    )
    assert len(result.adapter.deltas) == 16 and any(d.abs().max() > 0 for d in result.adapter.deltas.values())
    images = generate(
        model,
        "a photo of a cat and a dog",
        SampleConfig(num_inference_steps=2),
        adapter=result.adapter,
        concepts=["cat", "dog"],
    )
    assert images.images[0].size == (32, 32) and images.maps.shape == (1, 2, 8, 8)


def test_mask_padding_keeps_prompt_tokens_and_first_end_token(tmp_path):
    from sepen_core.config import SampleConfig
    from sepen_core.sampling import generate

    model = build_tiny_model(seed=0)
    model.mask_padding = True
    cond = model.encode_prompts(["a photo of a cat", ""])
    mask = cond.encoder_attention_mask
    assert mask[0, :7].tolist() == [0, 1, 1, 1, 1, 1, 1] and mask[0, 7:].sum() == 0  # a photo of a cat </s>
    assert mask[1, :3].tolist() == [0, 1, 0]  # the empty prompt keeps its end token: never an all-masked row
    result = generate(model, "a photo of a cat and a dog", SampleConfig(num_inference_steps=2), concepts=["cat", "dog"])
    assert torch.isfinite(result.pixels).all() and torch.isfinite(result.maps).all()
    model.save_pretrained(tmp_path / "m")
    assert load_base_model(tmp_path / "m").mask_padding is True


def test_model_cards_read_native_size_and_defaults_without_loading(tmp_path, tiny_model):
    """What the gateway learns from a model's files alone (no torch): the size sampling draws by default."""
    from sepen_core.model_card import model_card

    toy = model_card("toy")
    assert (toy.native_height, toy.native_width, toy.max_height) == (32, 32, 64)
    assert toy.defaults.sample["num_inference_steps"] == 20
    assert len(toy.nouns) == 24 and {"cherry", "sofa", "moon"} <= set(toy.nouns)  # its world.json's glyphs
    tiny_model.save_pretrained(tmp_path / "tiny")
    saved = model_card(str(tmp_path / "tiny"))
    assert (saved.native_height, saved.native_width) == (64, 64) == (model_card("tiny").native_height,) * 2
    assert saved.nouns == () == model_card("tiny").nouns
    (tmp_path / "tiny" / "world.json").write_text('{"glyphs": [{"shape": "disc"}]}')
    with pytest.raises(ModelLoadError, match="not a toy world's definition"):
        model_card(str(tmp_path / "tiny"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_card(str(tmp_path / "missing"))
    (tmp_path / "tiny" / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a readable diffusers model directory"):
        model_card(str(tmp_path / "tiny"))
