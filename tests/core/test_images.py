"""PNG metadata of generated images: sepen's own text chunks and the A1111 `parameters` chunk, read back the way the
AUTOMATIC1111 web UI parses it."""

import io

from PIL import Image

from sepen_core.config import SampleConfig
from sepen_core.images import a1111_parameters, png_bytes, sample_metadata, sampler_name
from sepen_core.sampling import generate
from tests.interop import parse_a1111, spectral_adapter


def test_parameters_parse_the_a1111_way():
    config = SampleConfig(num_inference_steps=30, guidance_scale=7.5, negative_prompt="blurry, dark")
    text = a1111_parameters(
        "a photo of a cat\nand a dog", 42, config, model="sd15", size=(768, 512), sampler="DDIM", adapter="cat-dog@3"
    )
    assert text.splitlines()[-1] == (
        "Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 768x512, Model: sd15, SepEn adapter: cat-dog@3"
    )
    assert parse_a1111(text) == {
        "Prompt": "a photo of a cat\nand a dog",
        "Negative prompt": "blurry, dark",
        "Steps": "30",
        "Sampler": "DDIM",
        "CFG scale": "7.5",
        "Seed": "42",
        "Size-1": "768",
        "Size-2": "512",
        "Model": "sd15",
        "SepEn adapter": "cat-dog@3",
    }


def test_values_with_commas_or_colons_are_quoted_as_a1111_does():
    text = a1111_parameters(
        "x", 1, SampleConfig(), model="models/sd, v1: 5", size=(64, 64), sampler="Euler a", adapter=None
    )
    assert 'Model: "models/sd, v1: 5"' in text and "SepEn adapter" not in text and "Negative prompt" not in text
    fields = parse_a1111(text)
    assert fields["Model"] == "models/sd, v1: 5" and fields["Sampler"] == "Euler a" and fields["Negative prompt"] == ""


def test_sampler_names():
    assert sampler_name("DDIMScheduler") == "DDIM" and sampler_name("EulerAncestralDiscreteScheduler") == "Euler a"
    assert sampler_name("FlowMatchEulerDiscreteScheduler") == "FlowMatchEulerDiscrete"


def test_the_chunk_sits_beside_sepens_own():
    config = SampleConfig(num_inference_steps=3)
    metadata = sample_metadata("a cat", 8, config, model="m", adapter="a.safetensors", size=(64, 32), sampler="DDIM")
    image = Image.open(io.BytesIO(png_bytes(Image.new("RGB", (64, 32)), metadata)))
    assert image.text["prompt"] == "a cat" and image.text["seed"] == "8" and image.text["adapter"] == "a.safetensors"
    assert parse_a1111(image.text["parameters"])["SepEn adapter"] == "a.safetensors"


def test_library_images_carry_the_parameters(tiny_model):
    adapter = spectral_adapter(tiny_model)
    config = SampleConfig(num_inference_steps=2, num_images=2, seed=11, negative_prompt="noise")
    result = generate(tiny_model, "a photo of a cat and a dog", config, adapter=adapter)
    image = Image.open(io.BytesIO(result.png(1)))
    assert image.text["seed"] == "12" and image.text["adapter"] == "cat-dog"
    fields = parse_a1111(image.text["parameters"])
    assert fields == {
        "Prompt": "a photo of a cat and a dog",
        "Negative prompt": "noise",
        "Steps": "2",
        "Sampler": "DDIM",
        "CFG scale": "6.0",
        "Seed": "12",
        "Size-1": "64",
        "Size-2": "64",
        "Model": "sepen-tiny-random-0",
        "SepEn adapter": "cat-dog",
    }
    named = parse_a1111(result.image_metadata(0, model="sepen-tiny", adapter="cat-dog@2")["parameters"])
    assert named["Model"] == "sepen-tiny" and named["SepEn adapter"] == "cat-dog@2" and named["Seed"] == "11"
    without = parse_a1111(
        generate(tiny_model, "a cat", SampleConfig(num_inference_steps=1)).image_metadata(0)["parameters"]
    )
    assert "SepEn adapter" not in without and without["Steps"] == "1"
