"""Exports of an adapter (sepen_core.export): each format's keys and the ComfyUI/A1111 patterns they must match, the
ranks `rank` and `energy` choose, the fidelity at each rank, the header's record, and errors naming the option."""

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sepen_core.adapter_file import read_adapter_file
from sepen_core.config import EXPORT_DTYPE_NAMES
from sepen_core.errors import AdapterFormatError, ConfigError
from sepen_core.export import EXPORT_DTYPES, export_adapter, lora_rank
from tests.interop import spectral_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return spectral_adapter(tiny_model)


def tensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors.numpy import load

    header_size = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8 : 8 + header_size])["__metadata__"]


def kohya_name(name: str) -> str:
    return "lora_unet_" + name.removesuffix(".weight").replace(".", "_")


# A1111's Lora extension maps kohya's diffusers-style names to its own (LDM) module names with these rules
# (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis); SD 1.x has cross-attention in
# input blocks 1, 2, 4, 5, 7, 8, the middle block and output blocks 3-11.
A1111_RULES = [
    (r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", lambda b, a, rest: f"input_blocks_{1 + 3 * b + a}_1_{rest}"),
    (r"lora_unet_mid_block_attentions_(\d+)_(.+)", lambda a, rest: f"middle_block_1_{rest}"),
    (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", lambda b, a, rest: f"output_blocks_{3 * b + a}_1_{rest}"),
]
SD1_LDM_KEY_LAYERS = {f"input_blocks_{i}_1" for i in (1, 2, 4, 5, 7, 8)} | {"middle_block_1"}
SD1_LDM_KEY_LAYERS |= {f"output_blocks_{i}_1" for i in range(3, 12)}


def a1111_module(key: str) -> str:
    network = key.split(".", 1)[0]
    for pattern, convert in A1111_RULES:
        match = re.fullmatch(pattern, network)
        if match:
            return "diffusion_model_" + convert(*[int(g) if g.isdigit() else g for g in match.groups()])
    raise AssertionError(f"{key} matches none of A1111's patterns")


def test_full_is_the_delta_itself_under_diff_keys(adapter, tiny_model):
    export = export_adapter(adapter.to_bytes(), "full")
    weights, header = tensors(export.data)
    assert set(weights) == {f"{kohya_name(n)}.diff" for n in tiny_model.base_keys}
    for name, delta in adapter.deltas.items():
        assert np.array_equal(weights[f"{kohya_name(name)}.diff"], delta.numpy())  # fp16 as stored: exact
    assert export.relative_error == 0 and export.energy_kept == 1 and header["sepen.export"] == "full"


def test_lora_keys_shapes_and_alphas_follow_each_convention(adapter, tiny_model):
    diffusers, _ = tensors(export_adapter(adapter.to_bytes(), "diffusers", rank=3).data)
    kohya, header = tensors(export_adapter(adapter.to_bytes(), "kohya", rank=3).data)
    for name, base in tiny_model.base_keys.items():
        out_dim, in_dim = base.shape
        module = name.removesuffix(".weight")
        assert diffusers[f"unet.{module}.lora_A.weight"].shape == (3, in_dim)
        assert diffusers[f"unet.{module}.lora_B.weight"].shape == (out_dim, 3)
        assert kohya[f"{kohya_name(name)}.lora_down.weight"].shape == (3, in_dim)
        assert kohya[f"{kohya_name(name)}.lora_up.weight"].shape == (out_dim, 3)
        assert kohya[f"{kohya_name(name)}.alpha"].shape == () and float(kohya[f"{kohya_name(name)}.alpha"]) == 3.0
    assert len(diffusers) == 2 * 16 and len(kohya) == 3 * 16
    assert header["ss_network_dim"] == header["ss_network_alpha"] == "3" and header["ss_output_name"] == "cat-dog"


@pytest.mark.parametrize("format", ["kohya", "full"])
def test_keys_match_the_comfyui_and_a1111_patterns(adapter, tiny_model, format):
    weights, _ = tensors(export_adapter(adapter.to_bytes(), format).data)
    # ComfyUI (comfy/lora.py, model_lora_keys_unet): "lora_unet_" + a diffusers UNet module path with "." -> "_",
    # then ".lora_up.weight", ".lora_down.weight", ".alpha" or ".diff" after the first dot.
    comfy_names = {"lora_unet_" + path.replace(".", "_") for path, _ in tiny_model.unet.named_modules() if path}
    suffixes = {"full": {"diff"}, "kohya": {"lora_up.weight", "lora_down.weight", "alpha"}}[format]
    for key in weights:
        network, suffix = key.split(".", 1)
        assert network in comfy_names and network.endswith("_attn2_to_k") and suffix in suffixes
    modules = {a1111_module(key) for key in weights}
    assert modules == {f"diffusion_model_{layer}_transformer_blocks_0_attn2_to_k" for layer in SD1_LDM_KEY_LAYERS}


def test_rank_and_energy_choose_the_documented_ranks(adapter):
    data = adapter.to_bytes()
    assert set(export_adapter(data, "kohya", rank=3).ranks.values()) == {3}
    assert set(export_adapter(data, "kohya", rank=1000).ranks.values()) == {32}  # capped at min(out, in)
    assert set(export_adapter(data, "kohya").ranks.values()) == {32}  # default: full rank
    energy = export_adapter(data, "diffusers", energy=0.95, dtype="fp32")
    for name, layer in energy.layers.items():
        singular = np.linalg.svd(adapter.deltas[name].double().numpy(), compute_uv=False)
        kept = np.cumsum(singular**2) / (singular**2).sum()
        assert layer.rank == int(np.argmax(kept >= 0.95)) + 1  # the smallest rank keeping 95 %
        assert layer.energy_kept == pytest.approx(kept[layer.rank - 1]) and layer.energy_kept >= 0.95
        assert layer.relative_error == pytest.approx(np.sqrt(1 - layer.energy_kept), rel=1e-4)  # Eckart-Young
    assert len(set(energy.ranks.values())) > 1, "the spectra differ, so the ranks should"
    assert lora_rank(np.zeros(4), None, 0.5) == 1 and lora_rank(np.array([2.0, 1.0]), None, 1.0) == 2


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp32", 1e-6), ("fp16", 1e-3)])
def test_full_rank_lora_reproduces_the_delta(adapter, dtype, tolerance):
    for format in ("diffusers", "kohya"):
        export = export_adapter(adapter.to_bytes(), format, dtype=dtype)
        assert export.relative_error < tolerance and export.energy_kept == pytest.approx(1.0)
        assert {t.dtype for t in tensors(export.data)[0].values()} == {np.dtype(EXPORT_DTYPES[dtype])}


def test_fidelity_falls_with_the_rank(adapter):
    ranks = (1, 2, 4, 8, 16, 32)
    errors = [export_adapter(adapter.to_bytes(), "kohya", rank=r, dtype="fp32").relative_error for r in ranks]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5 and errors[-1] < 1e-6


def test_header_carries_sepens_record_and_what_was_kept(adapter, tiny_model):
    export = export_adapter(adapter.to_bytes(), "diffusers", energy=0.9)
    _, header = tensors(export.data)
    assert header["sepen.base_model_id"] == "sepen-tiny-random-0"
    assert header["sepen.base_fingerprint"] == tiny_model.base_fingerprint
    assert header["sepen.adapter_sha256"] == adapter.sha256
    assert json.loads(header["sepen.concepts"]) == {"groups": [["cat", "dog"]]}
    assert json.loads(header["sepen.recipe"]) == {"steps": 3} and header["sepen.name"] == "cat-dog"
    assert header["sepen.rank"] == "full" and header["sepen.energy"] == "0.9"
    assert float(header["sepen.energy_kept"]) == pytest.approx(export.energy_kept, abs=1e-6)
    layers = json.loads(header["sepen.layers"])
    assert {m: v["rank"] for m, v in layers.items()} == {n.removesuffix(".weight"): r for n, r in export.ranks.items()}
    config = json.loads(header["lora_adapter_metadata"])  # what diffusers builds the LoraConfig from
    for name, rank in export.ranks.items():
        pattern = f"^{name.removesuffix('.weight')}"
        assert config["unet.rank_pattern"].get(pattern, config["unet.r"]) == rank
        assert config["unet.alpha_pattern"].get(pattern, config["unet.lora_alpha"]) == rank  # scale 1
    assert "sepen.summary" not in header


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"format": "onnx"}, "format"),
        ({"format": "kohya", "rank": 0}, "rank"),
        ({"format": "kohya", "rank": 2.5}, "rank"),
        ({"format": "kohya", "energy": 0.0}, "energy"),
        ({"format": "kohya", "energy": 1.5}, "energy"),
        ({"format": "kohya", "energy": float("nan")}, "energy"),
        ({"format": "diffusers", "rank": 4, "energy": 0.9}, "energy"),
        ({"format": "full", "rank": 4}, "rank"),
        ({"format": "full", "energy": 0.5}, "energy"),
        ({"format": "kohya", "dtype": "bf16"}, "dtype"),
    ],
)
def test_bad_options_name_their_field(adapter, options, field):
    with pytest.raises(ConfigError) as raised:
        export_adapter(adapter.to_bytes(), **options)
    assert raised.value.field == field


def test_only_sepen_adapters_are_exported(adapter):
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        export_adapter(b"not safetensors", "kohya")
    kohya = export_adapter(adapter.to_bytes(), "kohya").data
    with pytest.raises(AdapterFormatError, match="not a sepen key-projection adapter"):
        export_adapter(kohya, "full")
    corrupt = bytearray(adapter.to_bytes())
    corrupt[-3] ^= 0xFF
    with pytest.raises(AdapterFormatError, match="corrupt"):
        export_adapter(bytes(corrupt), "full")
    diverged = copy.deepcopy(adapter)
    next(iter(diverged.deltas.values()))[0, 0] = float("nan")
    with pytest.raises(AdapterFormatError, match="NaN"):
        export_adapter(diverged.to_bytes(), "kohya")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_the_torch_free_reader_agrees_with_the_adapter(tiny_model, dtype):
    adapter = spectral_adapter(tiny_model, dtype=dtype)
    parsed = read_adapter_file(adapter.to_bytes())
    assert parsed.stored_dtype == str(dtype).removeprefix("torch.") and parsed.tensors_sha256 == adapter.sha256
    assert parsed.base_fingerprint == adapter.base_fingerprint and parsed.metadata == adapter.metadata
    for name, delta in adapter.deltas.items():
        assert np.array_equal(parsed.deltas[name], delta.float().numpy())


def test_library_export_is_the_same_file_every_time(adapter):
    assert adapter.export("kohya", rank=2).data == export_adapter(adapter.to_bytes(), "kohya", rank=2).data
    assert set(EXPORT_DTYPE_NAMES) == set(EXPORT_DTYPES)


def sepen(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sepen_core.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_export_writes_the_file_and_says_what_it_kept(adapter, tmp_path):
    source = adapter.save(tmp_path / "cat-dog.safetensors")
    run = sepen(
        "export", str(source), "--format", "kohya", "--energy", "0.9", "--out", "out/cd.safetensors", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert "kohya: 16 layers, rank " in run.stdout and "energy kept 0.9" in run.stdout
    with safe_open(str(tmp_path / "out" / "cd.safetensors"), "np") as f:
        assert f.metadata()["sepen.energy"] == "0.9" and len(list(f.keys())) == 3 * 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
        (["--format", "kohya", "--rank", "0"], "argument --rank: must be a whole number from 1 to 65536"),
        (["--format", "kohya", "--energy", "1.5"], "argument --energy: must be a fraction in (0, 1]"),
        (["--format", "kohya", "--rank", "4", "--energy", "0.9"], "argument --energy: give rank or energy, not both"),
        (["--format", "full", "--rank", "4"], "argument --rank: applies to the LoRA formats"),
    ],
)
def test_cli_export_errors_name_the_option(adapter, tmp_path, args, message):
    source = adapter.save(tmp_path / "cat-dog.safetensors")
    run = sepen("export", str(source), *args, "--out", "x.safetensors", cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "x.safetensors").exists()
