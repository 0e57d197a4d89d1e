"""SDXL-shaped models: two text encoders, pooled embeddings and time ids, maps at 1/4 of the latent, the SepEn step,
sampling that matches diffusers' StableDiffusionXLPipeline, adapters, and directories saved, loaded and refused."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExciteConfig
from sepen_core.attention import (
    CrossAttentionProcessor,
    MapRecorder,
    capture_maps,
    installed_processors,
    map_layers,
    map_targets,
    unet_forward,
)
from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_core.diagnostics import diagnose
from sepen_core.errors import AdapterMismatchError, ModelLoadError
from sepen_core.finetuning import finetune
from sepen_core.model_card import model_card
from sepen_core.models import build_tiny_xl_model, key_projection_weights, load_base_model, load_model
from sepen_core.objective import make_training_batch, sepen_objective
from sepen_core.prompts import ConceptSet
from sepen_core.reference import reference_objective
from sepen_core.sampling import GenerationRequest, generate, generate_batch
from tests.interop import pipeline_images, spectral_adapter

PROMPT = "a cat and a dog"
QUICK = SampleConfig(num_inference_steps=4, guidance_scale=5.0, seed=11)


def test_the_tiny_xl_model_has_sdxls_layout(tiny_xl_model):
    model = tiny_xl_model
    assert model.architecture == "sdxl" and model.unet.config.addition_embed_type == "text_time"
    blocks = {name.split(".attentions")[0] for name in model.base_keys}
    # As in SDXL: no attention at the latent's own size (down_blocks.0, up_blocks.2).
    assert blocks == {"down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"}
    # Maps at 1/4 of the latent (SDXL at 1024 px: 32x32, the paper's 16x16 of SD at 512 px scaled with the image):
    # the deepest level, with two transformer blocks per attention as SDXL has ten.
    layers = map_layers(model.unet, 4)
    assert {name.split(".attentions")[0] for name in layers} == {"down_blocks.2", "mid_block", "up_blocks.0"}
    assert len(layers) == 2 * 2 + 2 + 3 * 2
    assert load_model("tiny-xl:0").base_fingerprint == model.base_fingerprint
    assert load_model("tiny-xl:1").base_fingerprint != model.base_fingerprint


def test_prompts_are_encoded_as_sdxl_encodes_them(tiny_xl_model):
    model = tiny_xl_model
    cond = model.encode_prompts([PROMPT, ""], (16, 24))
    assert cond.encoder_hidden_states.shape == (2, 77, 64)  # both encoders' 32 features side by side
    assert cond.pooled_embeds.shape == (2, 32)
    # Micro-conditioning in pixels: (height, width, crop top, crop left, height, width); the tiny VAE halves.
    assert cond.time_ids.tolist() == [[32, 48, 0, 0, 32, 48]] * 2
    native = model.encode_prompts([PROMPT])
    assert native.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    negative = model.encode_negative_prompts(["", "blurry"])
    assert negative.encoder_hidden_states[0].abs().max() == 0 and negative.pooled_embeds[0].abs().max() == 0
    assert negative.encoder_hidden_states[1].abs().max() > 0
    picked = torch.cat([cond.select([1]).time_ids, cond.select([0]).pooled_embeds], dim=1)
    assert picked.shape == (1, 6 + 32)


@pytest.mark.parametrize(
    ("negative_prompt", "size"), [(None, None), ("blurry, a bird", None), (None, (96, 64)), ("blurry", (48, 80))]
)
def test_sampling_matches_diffusers_stable_diffusion_xl_pipeline(tiny_xl_model, negative_prompt, size):
    """At the native size and others (the time ids state the size made), with and without a negative prompt."""
    height, width = size or (None, None)
    config = SampleConfig(
        num_inference_steps=5, guidance_scale=5.0, seed=11, negative_prompt=negative_prompt or "", height=height,
        width=width,
    )  # fmt: skip
    ours = generate(tiny_xl_model, PROMPT, config)
    pipe = tiny_xl_model.diffusers_pipeline()
    theirs = pipe(
        PROMPT,
        negative_prompt=negative_prompt,
        num_inference_steps=5,
        guidance_scale=5.0,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(11),
        output_type="pt",
    ).images
    assert theirs.shape[-2:] == ((height, width) if size else (64, 64))
    assert (theirs.cpu() - ours.pixels).abs().max() < 1e-5
    assert ours.pixels.std() > 0.01  # an image, not a constant


def test_the_early_exit_capture_gives_the_whole_forwards_maps(tiny_xl_model):
    model = tiny_xl_model
    cond = model.encode_prompts([PROMPT, "a dog and a cat"])
    targets = map_targets(model, cond, [["cat", "dog"], ["dog", "cat"]], 4, (32, 32))
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([500, 900])
    early = capture_maps(model.unet, latents, timesteps, cond, targets).maps()
    whole = MapRecorder(targets)
    with installed_processors(model.unet, {name: CrossAttentionProcessor(whole) for name in targets.layers}):
        with torch.no_grad():
            unet_forward(model.unet, latents, timesteps, cond)
    assert early.shape == (2, 2, 8, 8)
    assert torch.allclose(early, whole.maps(), atol=1e-6)
    # The added conditioning matters: other time ids change the maps.
    other = model.encode_prompts([PROMPT, "a dog and a cat"], (16, 16))
    assert not torch.allclose(capture_maps(model.unet, latents, timesteps, other, targets).maps(), early, atol=1e-6)


def test_sepen_gradients_equal_the_whole_unet_reference(tiny_xl_model):
    model = tiny_xl_model
    config = FinetuneConfig(batch_size=2)
    batch = make_training_batch(model, ConceptSet.pairs(("cat", "dog")), config, step=0)
    grads = []
    for objective in (reference_objective, sepen_objective):
        params = {n: p for n, p in model.unet.named_parameters() if n in model.base_keys}
        for p in params.values():
            p.requires_grad_(True)
        try:
            objective(model, batch, config).loss.total.backward()
            grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
    reference, ours = grads
    assert sorted(reference) == sorted(ours) and not any(n.startswith("up_blocks.1.") for n in ours)
    for name in reference:
        assert F.cosine_similarity(reference[name].flatten(), ours[name].flatten(), dim=0) >= 0.9999, name


def test_finetune_inspect_and_generate_with_an_sdxl_adapter(tmp_path):
    model = build_tiny_xl_model(0)
    base_keys = {n: w.clone() for n, w in model.base_keys.items()}
    frozen = {n: p.clone() for n, p in model.unet.named_parameters() if n not in base_keys}
    result = finetune(
        model, ConceptSet.pairs(("cat", "dog")), FinetuneConfig(steps=3, learning_rate=1e-2, batch_size=2)
    )
    adapter = KeyProjectionAdapter.load(result.adapter.save(tmp_path / "xl.safetensors"))
    assert adapter.base_architecture == "sdxl" and sorted(adapter.layer_names) == sorted(base_keys)
    assert all(torch.equal(p, frozen[n]) for n, p in model.unet.named_parameters() if n in frozen)
    assert max(float(adapter.delta(n).float().abs().max()) for n in adapter.layer_names) > 0

    base = generate(model, PROMPT, QUICK)
    tuned = generate(model, PROMPT, QUICK, adapter=adapter)
    assert (tuned.pixels - base.pixels).abs().max() > 1e-4
    batched = generate_batch(model, [GenerationRequest(PROMPT, QUICK, adapter), GenerationRequest(PROMPT, QUICK)])
    assert (batched[0].pixels - tuned.pixels).abs().max() < 1e-5
    assert (batched[1].pixels - base.pixels).abs().max() < 1e-5

    diagnosis = diagnose(model, PROMPT, ["cat", "dog"], adapter=adapter, samples=4)
    assert set(diagnosis.peaks) == {"cat", "dog"} and 0 < diagnosis.min_peak <= 1
    excited = generate(model, PROMPT, QUICK, concepts=["cat", "dog"], attend_excite=AttendExciteConfig())
    assert (excited.pixels - base.pixels).abs().max() > 0
    unet_keys = key_projection_weights(model.unet)
    assert all(torch.equal(unet_keys[n], base_keys[n]) for n in base_keys)  # nothing stayed applied

    with pytest.raises(AdapterMismatchError):
        adapter.apply(load_model("tiny"))


def test_an_sdxl_directory_saves_loads_and_reads_as_sdxl(tiny_xl_model, tmp_path):
    tiny_xl_model.save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    loaded = load_base_model(tmp_path / "xl")
    assert loaded.architecture == "sdxl" and loaded.base_fingerprint == tiny_xl_model.base_fingerprint
    assert (generate(loaded, PROMPT, QUICK).pixels - generate(tiny_xl_model, PROMPT, QUICK).pixels).abs().max() < 1e-6
    card = model_card(str(tmp_path / "xl"))
    assert card.architecture == "sdxl" and (card.native_height, card.native_width) == (64, 64)
    assert model_card("tiny-xl").architecture == "sdxl" and model_card("tiny").architecture == "sd"


@pytest.mark.parametrize(
    ("pipeline", "folder"), [("FluxPipeline", "transformer"), ("StableDiffusion3Pipeline", "transformer")]
)
def test_models_without_cross_attention_keys_are_refused_naming_what_is_supported(tmp_path, pipeline, folder):
    (tmp_path / folder).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    for read in (lambda: load_base_model(tmp_path), lambda: model_card(str(tmp_path))):
        with pytest.raises(ModelLoadError) as error:
            read()
        message = str(error.value)
        assert pipeline in message and "StableDiffusionXLPipeline" in message and "attn2.to_k" in message


def test_an_sd_directory_saved_by_another_pipeline_of_the_family_loads(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "img2img")
    index_file = tmp_path / "img2img" / "model_index.json"
    index_file.write_text(
        json.dumps({**json.loads(index_file.read_text()), "_class_name": "StableDiffusionImg2ImgPipeline"})
    )
    assert load_base_model(tmp_path / "img2img").architecture == "sd"
    assert model_card(str(tmp_path / "img2img")).architecture == "sd"


def test_an_sdxl_directory_without_its_second_text_encoder_is_refused(tiny_xl_model, tmp_path):
    tiny_xl_model.save_pretrained(tmp_path / "xl")
    (tmp_path / "xl" / "text_encoder_2").rename(tmp_path / "elsewhere")
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_base_model(tmp_path / "xl")


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
def test_exports_load_into_diffusers_sdxl_pipeline_and_draw_what_sepen_draws(tiny_xl_model, tmp_path, export_format):
    """diffusers reads the diffusers file and converts the kohya file's SDXL (SGM) names to its own modules."""
    adapter = dataclasses.replace(spectral_adapter(tiny_xl_model, top=2.0), base_architecture="sdxl")
    path = tmp_path / f"{export_format}.safetensors"
    path.write_bytes(adapter.export(export_format, dtype="fp32").data)
    pipe = tiny_xl_model.diffusers_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="sepen")
    theirs = pipeline_images(pipe, PROMPT, [5, 6])
    config = SampleConfig(num_inference_steps=4, num_images=2, seed=5)
    ours = generate(tiny_xl_model, PROMPT, config, adapter=adapter).pixels.permute(0, 2, 3, 1).numpy()
    base = generate(tiny_xl_model, PROMPT, config).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - ours).max() < 1e-4 < np.abs(ours - base).max()
    pipe.unload_lora_weights()
    assert np.abs(pipeline_images(pipe, PROMPT, [5, 6]) - base).max() < 1e-5


def test_a_low_rank_sdxl_adapter_is_small_and_applies_its_truncation(tiny_xl_model):
    adapter = dataclasses.replace(spectral_adapter(tiny_xl_model, top=2.0), base_architecture="sdxl")
    small = adapter.low_rank(rank=2)
    assert len(small.to_bytes()) < len(adapter.to_bytes()) / 4
    restored = KeyProjectionAdapter.from_bytes(small.to_bytes())
    assert restored.base_architecture == "sdxl" and restored.metadata["storage"]["rank"] == 2
    for name in adapter.layer_names:
        u, s, vh = torch.linalg.svd(adapter.delta(name).double())
        truncated = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(restored.delta(name).double(), truncated, atol=2e-3), name


def test_the_diffusers_export_fuses_and_sepens_apply_composes_with_a_lora_on_an_sdxl_pipeline(tiny_xl_model, tmp_path):
    adapter = dataclasses.replace(spectral_adapter(tiny_xl_model, top=2.0), base_architecture="sdxl")
    path = tmp_path / "diffusers.safetensors"
    path.write_bytes(adapter.export("diffusers", dtype="fp32").data)
    config = SampleConfig(num_inference_steps=4, num_images=2, seed=5)
    ours = generate(tiny_xl_model, PROMPT, config, adapter=adapter).pixels.permute(0, 2, 3, 1).numpy()
    pipe = tiny_xl_model.diffusers_pipeline()
    base_keys = {n: w.clone() for n, w in key_projection_weights(pipe.unet).items()}
    pipe.load_lora_weights(str(path), adapter_name="sepen")
    pipe.fuse_lora()
    assert np.abs(pipeline_images(pipe, PROMPT, [5, 6]) - ours).max() < 1e-4
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(torch.allclose(w, base_keys[n], atol=1e-5) for n, w in key_projection_weights(pipe.unet).items())

    # sepen's own adapter onto a pipeline that holds the exported LoRA at weight 0 (a fresh one: fuse and unfuse
    # leave the keys within float rounding, and apply() insists on the exact base keys): the images are sepen's.
    pipe = tiny_xl_model.diffusers_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="idle")
    pipe.set_adapters(["idle"], adapter_weights=[0.0])
    adapter.apply(pipe)
    assert np.abs(pipeline_images(pipe, PROMPT, [5, 6]) - ours).max() < 1e-4
    adapter.remove(pipe)
    assert all(torch.equal(w, base_keys[n]) for n, w in key_projection_weights(pipe.unet).items())


def test_an_inpainting_unet_is_refused_naming_its_channels(tmp_path):
    from diffusers import UNet2DConditionModel

    from sepen_core.models import load_clip_tokenizer, tiny_unet_config

    model = load_model("tiny")
    inpainting = UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9})
    with pytest.raises(ModelLoadError, match="takes 9 channels"):
        type(model)(inpainting, model.text_encoder, load_clip_tokenizer(), model.scheduler, model.vae, "inpainting")


def test_in_fp16_the_sdxl_vae_stays_fp32_and_the_images_are_the_fp32_ones_within_rounding(tiny_xl_model):
    """SDXL's VAE overflows in fp16 (its config's force_upcast): it decodes in fp32 as in diffusers."""
    half = load_model("tiny-xl", dtype="fp16")
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    cond = half.encode_prompts([PROMPT])
    assert cond.time_ids.dtype == cond.pooled_embeds.dtype == torch.float16
    ours, reference = generate(half, PROMPT, QUICK).pixels, generate(tiny_xl_model, PROMPT, QUICK).pixels
    assert ours.dtype == torch.float32 and (ours - reference).abs().max() < 0.02
