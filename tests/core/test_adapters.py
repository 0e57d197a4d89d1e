"""Adapters: safetensors round trip with metadata, refusal of a wrong base model, use in a plain diffusers pipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_core.errors import AdapterFormatError, AdapterMismatchError
from sepen_core.finetuning import finetune
from sepen_core.models import build_tiny_model
from sepen_core.prompts import ConceptSet
from sepen_core.sampling import generate
from tests.interop import pipeline_images


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return finetune(
        tiny_model,
        ConceptSet.pairs(("cat", "dog")),
        FinetuneConfig(steps=2, batch_size=2, learning_rate=1e-2),
        adapter_metadata={"name": "cat-dog", "job_id": "job-1"},
    ).adapter


def test_file_holds_16_fp16_key_deltas_and_metadata(adapter, tiny_model, tmp_path):
    path = adapter.save(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        names = sorted(f.keys())
        header = f.metadata()
        dtypes = {f.get_tensor(n).dtype for n in names}
    assert names == sorted(tiny_model.base_keys) and len(names) == 16 and dtypes == {torch.float16}
    assert header["format_version"] == "1" and header["base_model_id"] == "sepen-tiny-random-0"
    assert header["base_fingerprint"] == tiny_model.base_fingerprint
    meta = json.loads(header["metadata"])
    assert meta["concepts"]["groups"] == [["cat", "dog"]] and meta["recipe"]["learning_rate"] == 1e-2
    assert meta["steps"] == 2 and meta["seed"] == 0 and meta["job_id"] == "job-1"
    loaded = KeyProjectionAdapter.load(path)
    assert loaded.sha256 == adapter.sha256 == header["tensors_sha256"]
    assert all(torch.equal(loaded.deltas[n], adapter.deltas[n]) for n in names)


def test_corrupt_or_foreign_files_are_refused(adapter, tmp_path):
    data = bytearray(adapter.to_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor
    with pytest.raises(AdapterFormatError, match="corrupt"):
        KeyProjectionAdapter.from_bytes(bytes(data))
    with pytest.raises(AdapterFormatError):
        KeyProjectionAdapter.from_bytes(b"not a safetensors file at all")


def test_wrong_base_model_is_refused(adapter):
    other = build_tiny_model(seed=1)
    with pytest.raises(AdapterMismatchError, match="sepen-tiny-random-0"):
        adapter.apply(other)


def test_applied_restores_base_keys(adapter, tiny_model):
    before = {n: p.clone() for n, p in tiny_model.unet.named_parameters() if n in tiny_model.base_keys}
    with adapter.applied(tiny_model):
        changed = [n for n, p in tiny_model.unet.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert len(changed) == 10
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters() if n in before)


def test_plain_diffusers_pipeline_gives_the_same_images(adapter, tmp_path):
    model = build_tiny_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True, safety_checker=None)
    adapter.apply(pipe)
    prompt, seeds = "a photo of a cat and a dog", [5, 6]
    theirs = pipeline_images(pipe, prompt, seeds)
    ours = generate(model, prompt, SampleConfig(num_inference_steps=4, num_images=2, seed=5), adapter=adapter).pixels
    base = generate(model, prompt, SampleConfig(num_inference_steps=4, num_images=2, seed=5)).pixels
    assert np.abs(theirs - ours.permute(0, 2, 3, 1).numpy()).max() < 1e-4
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the images
    with pytest.raises(AdapterMismatchError):
        adapter.apply(pipe)  # its keys are no longer the base keys
