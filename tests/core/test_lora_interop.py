"""sepen adapters with diffusers and PEFT: exports loaded by `load_lora_weights` (diffusers and kohya keys) give what
sepen's own apply() gives, with set_adapters weights, fuse/unfuse, unload and beside another LoRA; and apply()/remove()
work on a UNet that holds PEFT LoRAs, in either order, remove() giving back the exact base weights."""

import copy
import pickle

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.config import SampleConfig
from sepen_core.errors import AdapterError, AdapterMismatchError
from sepen_core.models import key_projection_weights
from sepen_core.sampling import generate
from tests.interop import pipeline_images, spectral_adapter

# UNet outputs (noise predictions of unit scale) of an export against sepen's apply(), at full rank. fp32 factors
# differ from the delta by rounding only; fp16 factors add fp16's rounding (the export's relative error ~3e-4).
OUTPUT_TOLERANCE = {"fp32": 1e-5, "fp16": 5e-5}


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return spectral_adapter(tiny_model, top=2.0)  # strong enough to move the outputs well past the tolerances


@pytest.fixture(scope="module")
def unet_input():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)


def output(unet, unet_input) -> torch.Tensor:
    latents, encoder_hidden_states = unet_input
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=encoder_hidden_states).sample


@pytest.fixture(scope="module")
def reference(tiny_model, adapter, unet_input):
    """Outputs of the base UNet and of the UNet with sepen's apply() at scales 1 and 0.5."""
    unet = copy.deepcopy(tiny_model.unet)
    outputs = {"base": output(unet, unet_input)}
    for scale in (1.0, 0.5):
        with adapter.applied(unet, scale):
            outputs[scale] = output(unet, unet_input)
    assert (outputs[1.0] - outputs["base"]).abs().max() > 0.05, "the adapter should change the outputs"
    return outputs


def save(tmp_path, export, name="sepen.safetensors"):
    path = tmp_path / name
    path.write_bytes(export.data)
    return str(path)


def other_lora(model, rank: int = 4, seed: int = 9) -> dict[str, torch.Tensor]:
    """Another LoRA in PEFT's keys, on the same key layers and on the value projections."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, weight in model.unet.named_parameters():
        if name.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")):
            module = name.removesuffix(".weight")
            lora[f"unet.{module}.lora_A.weight"] = 0.3 * torch.randn(rank, weight.shape[1], generator=generator)
            lora[f"unet.{module}.lora_B.weight"] = 0.3 * torch.randn(weight.shape[0], rank, generator=generator)
    return lora


def with_deltas(model, deltas: dict[str, torch.Tensor]):
    """A copy of the model's UNet with these deltas added to its weights, by hand: the expected result."""
    unet = copy.deepcopy(model.unet)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name] += delta.float()
    return unet


def lora_deltas(lora: dict[str, torch.Tensor], weight: float = 1.0) -> dict[str, torch.Tensor]:
    """PEFT's B @ A per layer (alpha = rank: scale 1), times the adapter weight."""
    return {
        key.removeprefix("unet.").replace(".lora_A.weight", ".weight"): weight
        * (lora[key.replace("lora_A", "lora_B")] @ lora[key])
        for key in lora
        if ".lora_A." in key
    }


def plain_state(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_full_rank_export_loads_and_matches_apply(tiny_model, adapter, reference, unet_input, tmp_path, format, dtype):
    pipe = tiny_model.diffusers_pipeline()
    pipe.load_lora_weights(save(tmp_path, adapter.export(format, dtype=dtype)), adapter_name="sepen")
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 16 and all(m.scaling["sepen"] == 1.0 for m in layers)
    assert (output(pipe.unet, unet_input) - reference[1.0]).abs().max() < OUTPUT_TOLERANCE[dtype]


def test_energy_export_keeps_each_layers_rank_at_scale_one(tiny_model, adapter, unet_input, tmp_path):
    export = adapter.export("diffusers", energy=0.9, dtype="fp32")
    pipe = tiny_model.diffusers_pipeline()
    pipe.load_lora_weights(save(tmp_path, export), adapter_name="sepen")
    loaded = {f"{n}.weight": m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert {name: m.r["sepen"] for name, m in loaded.items()} == export.ranks
    assert len(set(export.ranks.values())) > 1 and all(m.scaling["sepen"] == 1.0 for m in loaded.values())
    truncated = KeyProjectionAdapter(
        {n: m.lora_B["sepen"].weight @ m.lora_A["sepen"].weight for n, m in loaded.items()},
        adapter.base_model_id,
        adapter.base_fingerprint,
    )
    unet = copy.deepcopy(tiny_model.unet)
    truncated.apply(unet)
    assert (output(pipe.unet, unet_input) - output(unet, unet_input)).abs().max() < 1e-5


def test_set_adapters_fuse_unfuse_and_unload(tiny_model, adapter, reference, unet_input, tmp_path):
    pipe = tiny_model.diffusers_pipeline()
    base = plain_state(pipe.unet)
    pipe.load_lora_weights(save(tmp_path, adapter.export("diffusers", dtype="fp32")), adapter_name="sepen")
    pipe.set_adapters(["sepen"], adapter_weights=[0.5])
    assert (output(pipe.unet, unet_input) - reference[0.5]).abs().max() < 1e-5
    pipe.set_adapters(["sepen"], adapter_weights=[1.0])
    pipe.fuse_lora(lora_scale=1.0)
    fused = key_projection_weights(pipe.unet)
    for name, delta in adapter.deltas.items():
        assert torch.allclose(fused[name], base[name] + delta.float(), atol=1e-5)
    assert (output(pipe.unet, unet_input) - reference[1.0]).abs().max() < 1e-5
    pipe.unfuse_lora()
    for name, weight in key_projection_weights(pipe.unet).items():
        assert torch.allclose(weight, base[name], atol=1e-6)
    pipe.unload_lora_weights()
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    assert (output(pipe.unet, unet_input) - reference["base"]).abs().max() < 1e-5


def test_unload_without_fusing_gives_back_the_exact_base(tiny_model, adapter, tmp_path):
    pipe = tiny_model.diffusers_pipeline()
    base = plain_state(pipe.unet)
    pipe.load_lora_weights(save(tmp_path, adapter.export("kohya")), adapter_name="sepen")
    pipe.unload_lora_weights()
    after = plain_state(pipe.unet)
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)


def test_export_beside_another_lora(tiny_model, adapter, unet_input, tmp_path):
    other = other_lora(tiny_model)
    pipe = tiny_model.diffusers_pipeline()
    pipe.load_lora_weights(save(tmp_path, adapter.export("kohya", dtype="fp32")), adapter_name="sepen")
    pipe.load_lora_weights(other, adapter_name="other")
    pipe.set_adapters(["sepen", "other"], adapter_weights=[1.0, 0.7])
    expected = with_deltas(tiny_model, adapter.deltas)
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for name, delta in lora_deltas(other, 0.7).items():
            params[name] += delta
    assert (output(pipe.unet, unet_input) - output(expected, unet_input)).abs().max() < 1e-5
    pipe.delete_adapters("other")
    unet = copy.deepcopy(tiny_model.unet)
    adapter.apply(unet)
    assert (output(pipe.unet, unet_input) - output(unet, unet_input)).abs().max() < 1e-5


def test_pipeline_images_of_the_export_match_sepens_own(tiny_model, adapter, tmp_path):
    """Images through diffusers' own pipeline with the diffusers export against sepen's generate() with apply()."""
    pipe = tiny_model.diffusers_pipeline()
    pipe.load_lora_weights(save(tmp_path, adapter.export("diffusers")), adapter_name="sepen")
    prompt, seeds = "a photo of a cat and a dog", [5, 6]
    theirs = pipeline_images(pipe, prompt, seeds)
    config = SampleConfig(num_inference_steps=4, num_images=2, seed=5)
    ours = generate(tiny_model, prompt, config, adapter=adapter).pixels.permute(0, 2, 3, 1).numpy()
    base = generate(tiny_model, prompt, config).pixels.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - ours).max() < 1e-4 < np.abs(ours - base).max()


# -- sepen's apply() beside PEFT LoRAs -----------------------------------------------------------------------------


def test_apply_onto_a_unet_holding_a_lora_then_remove(tiny_model, adapter, unet_input):
    other = other_lora(tiny_model)
    pipe = tiny_model.diffusers_pipeline()
    base = plain_state(pipe.unet)
    pipe.load_lora_weights(other, adapter_name="other")  # wraps every to_k in a LoRA layer
    adapter.apply(pipe)
    expected = with_deltas(tiny_model, {**lora_deltas(other)})
    with torch.no_grad():
        for name, param in expected.named_parameters():
            if name in adapter.deltas:
                param += adapter.deltas[name].float()
    assert (output(pipe.unet, unet_input) - output(expected, unet_input)).abs().max() < 1e-5
    adapter.remove(pipe)
    assert all(torch.equal(w, base[n]) for n, w in key_projection_weights(pipe.unet).items())  # exact
    pipe.unload_lora_weights()
    after = plain_state(pipe.unet)
    assert all(torch.equal(after[n], base[n]) for n in base)


def test_a_lora_loaded_after_apply_then_both_removed(tiny_model, adapter, reference, unet_input):
    other = other_lora(tiny_model)
    pipe = tiny_model.diffusers_pipeline()
    base = plain_state(pipe.unet)
    adapter.apply(pipe.unet)
    pipe.load_lora_weights(other, adapter_name="other")
    expected = with_deltas(tiny_model, lora_deltas(other))
    with torch.no_grad():
        for name, param in expected.named_parameters():
            if name in adapter.deltas:
                param += adapter.deltas[name].float()
    assert (output(pipe.unet, unet_input) - output(expected, unet_input)).abs().max() < 1e-5
    pipe.unload_lora_weights()
    assert (output(pipe.unet, unet_input) - reference[1.0]).abs().max() < 1e-6
    adapter.remove(pipe.unet)
    after = plain_state(pipe.unet)
    assert all(torch.equal(after[n], base[n]) for n in base)


def test_remove_keeps_a_lora_fused_in_meanwhile(tiny_model, adapter):
    other = other_lora(tiny_model)
    pipe = tiny_model.diffusers_pipeline()
    base = plain_state(pipe.unet)
    adapter.apply(pipe)
    pipe.load_lora_weights(other, adapter_name="other")
    pipe.fuse_lora()
    adapter.remove(pipe)  # takes out sepen's delta only: the fused LoRA stays
    lora = lora_deltas(other)
    for name, weight in key_projection_weights(pipe.unet).items():
        assert torch.allclose(weight, base[name] + lora[name], atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = plain_state(pipe.unet)
    assert all(torch.allclose(after[n], base[n], atol=1e-5) for n in base)


def test_keys_changed_by_a_fused_lora_are_refused(tiny_model, adapter):
    pipe = tiny_model.diffusers_pipeline()
    pipe.load_lora_weights(other_lora(tiny_model), adapter_name="other")
    pipe.fuse_lora()
    with pytest.raises(AdapterMismatchError, match="unfuse"):
        adapter.apply(pipe)


def test_remove_needs_an_applied_adapter(tiny_model, adapter):
    with pytest.raises(AdapterError, match="not applied"):
        adapter.remove(tiny_model.diffusers_pipeline())


def test_an_applied_adapter_still_pickles_and_its_copy_is_not_applied(tiny_model, adapter):
    pipe = tiny_model.diffusers_pipeline()
    adapter.apply(pipe)
    copied = pickle.loads(pickle.dumps(adapter))
    assert copied.sha256 == adapter.sha256
    with pytest.raises(AdapterError, match="not applied"):
        copied.remove(pipe)
    adapter.remove(pipe)
