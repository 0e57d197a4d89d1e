"""Low-rank storage of adapters (a recipe's `rank` or `energy`, KeyProjectionAdapter.low_rank): the version-2 file and
its round trip, apply() of the factors, the ranks chosen, finetune and CLI, errors naming the field or the layer, the
torch-free reader, exports that match the dense equivalent's; SDXL's kohya names (sepen_core.export.kohya_name)."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from sepen_core.adapter_file import FORMAT, read_adapter_file, safetensors_metadata
from sepen_core.adapters import KeyProjectionAdapter, tensors_sha256
from sepen_core.config import FinetuneConfig
from sepen_core.errors import AdapterError, AdapterFormatError, ConfigError
from sepen_core.export import factorise, factorise_product, kohya_name, sgm_stride
from sepen_core.finetuning import finetune
from sepen_core.prompts import ConceptSet
from tests.interop import spectral_adapter

PAIR = ConceptSet.pairs(("cat", "dog"))
FAST = dict(steps=2, batch_size=2, learning_rate=1e-2, prior_weight=0.5)  # the prior moves all 16 layers


@pytest.fixture(scope="module")
def dense(tiny_model):
    return spectral_adapter(tiny_model)


def dense_equivalent(adapter: KeyProjectionAdapter) -> KeyProjectionAdapter:
    """The dense adapter holding each layer's delta as a low-rank adapter's delta(name) gives it."""
    return KeyProjectionAdapter(
        {n: adapter.delta(n) for n in adapter.layer_names}, adapter.base_model_id, adapter.base_fingerprint
    )


def numpy_spectrum(delta: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(delta.double().numpy(), compute_uv=False)


def test_low_rank_file_round_trip(dense, tiny_model):
    low = dense.low_rank(rank=4)
    data = low.to_bytes()
    header = safetensors_metadata(data)
    assert header["format_version"] == "2" and header["representation"] == "low_rank"
    assert header["tensors_sha256"] == low.sha256 and "base_architecture" not in header
    loaded = KeyProjectionAdapter.from_bytes(data)
    assert loaded.is_low_rank and loaded.deltas == {} and loaded.layer_names == sorted(tiny_model.base_keys)
    for name, (up, down) in low.factors.items():
        out_dim, in_dim = tiny_model.base_keys[name].shape
        assert up.shape == (out_dim, 4) and down.shape == (4, in_dim) and up.dtype == down.dtype == torch.float16
        assert torch.equal(loaded.factors[name][0], up) and torch.equal(loaded.factors[name][1], down)
        assert torch.equal(loaded.delta(name), low.delta(name))
        assert torch.allclose(up.float().norm(dim=0), down.float().norm(dim=1), rtol=2e-3)  # √S in both factors
    assert loaded.sha256 == low.sha256 and loaded.metadata == low.metadata
    assert loaded.metadata["storage"]["rank"] == 4 and loaded.metadata["storage"]["energy"] is None
    assert loaded.metadata["name"] == "cat-dog"  # the dense adapter's metadata stays
    shapes = [base.shape for base in tiny_model.base_keys.values()]
    assert low.num_parameters == sum(4 * (out + in_) for out, in_ in shapes)
    assert dense.num_parameters == sum(out * in_ for out, in_ in shapes) > 4 * low.num_parameters
    assert len(data) < len(dense.to_bytes()) / 3


def test_dense_files_keep_their_version_1_header(dense):
    header = safetensors_metadata(dense.to_bytes())
    assert set(header) == {
        "format",
        "format_version",
        "representation",
        "base_model_id",
        "base_fingerprint",
        "tensors_sha256",
        "metadata",
    }
    assert header["format_version"] == "1" and header["representation"] == "delta"
    assert header["tensors_sha256"] == tensors_sha256(dense.deltas) == dense.sha256


def test_apply_adds_the_truncated_delta(dense, tiny_model):
    low = dense.low_rank(rank=3)
    with low.applied(tiny_model):
        ours = {n: tiny_model.unet.get_parameter(n).detach().clone() for n in tiny_model.base_keys}
    with dense_equivalent(low).applied(tiny_model):
        theirs = {n: tiny_model.unet.get_parameter(n).detach().clone() for n in tiny_model.base_keys}
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert all(torch.equal(tiny_model.unet.get_parameter(n), b) for n, b in tiny_model.base_keys.items())  # removed
    keys = low.key_weights(tiny_model)
    assert all(torch.equal(keys[n], ours[n]) for n in ours)
    norm_sq = kept_sq = 0.0
    for name, delta in dense.deltas.items():  # each layer holds its best rank-3 approximation, up to fp16 rounding
        u, s, vt = np.linalg.svd(delta.double().numpy())
        best = (u[:, :3] * s[:3]) @ vt[:3]
        assert np.abs(low.delta(name).double().numpy() - best).max() < 2e-3 * s[0]
        norm_sq, kept_sq = norm_sq + (s**2).sum(), kept_sq + (s[:3] ** 2).sum()
    storage = low.metadata["storage"]
    assert storage["energy_kept"] == pytest.approx(kept_sq / norm_sq, abs=1e-5) and storage["energy_kept"] < 0.99
    assert storage["relative_error"] == pytest.approx(np.sqrt(1 - kept_sq / norm_sq), rel=1e-2)  # Eckart-Young


def test_energy_picks_each_layers_rank(dense):
    low = dense.low_rank(energy=0.95)
    ranks = {name: up.shape[1] for name, (up, _) in low.factors.items()}
    for name, delta in dense.deltas.items():
        kept = np.cumsum(numpy_spectrum(delta) ** 2) / (numpy_spectrum(delta) ** 2).sum()
        assert ranks[name] == int(np.argmax(kept >= 0.95)) + 1, name  # the smallest rank keeping 95 %
    assert len(set(ranks.values())) > 1, "the spectra differ, so the ranks should"
    assert low.metadata["storage"]["energy"] == 0.95 and low.metadata["storage"]["energy_kept"] >= 0.95
    assert {up.shape[1] for up, _ in dense.low_rank(rank=1000).factors.values()} == {32}  # capped at the size


def test_finetune_with_a_rank_stores_the_factors_of_the_same_training(tiny_model):
    full = finetune(tiny_model, PAIR, FinetuneConfig(**FAST)).adapter
    low = finetune(tiny_model, PAIR, FinetuneConfig(**FAST, rank=2)).adapter
    assert not full.is_low_rank and low.is_low_rank
    assert {(up.shape[1], down.shape[0]) for up, down in low.factors.values()} == {(2, 2)}
    assert len(low.to_bytes()) < len(full.to_bytes()) / 4
    recipe, storage = low.metadata["recipe"], low.metadata["storage"]
    assert recipe["rank"] == 2 and recipe["energy"] is None and storage["rank"] == 2
    assert 0 < storage["energy_kept"] < 1 and storage["relative_error"] > 0
    expected = full.low_rank(rank=2)  # training is the same: the stored factors are the dense result's
    assert all(torch.equal(low.delta(n), expected.delta(n)) for n in low.layer_names)
    assert any(float(low.delta(n).abs().max()) > 0 for n in low.layer_names)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 65537}, "rank"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"energy": float("nan")}, "energy"),
        ({"rank": 4, "energy": 0.9}, "energy"),
    ],
)
def test_bad_rank_or_energy_name_their_field(dense, settings, field):
    with pytest.raises(ConfigError) as raised:
        FinetuneConfig.from_dict(settings)
    assert raised.value.field == field
    with pytest.raises(ConfigError) as raised:
        dense.low_rank(**settings)
    assert raised.value.field == field


def low_rank_file(factors: dict[str, torch.Tensor], **header) -> bytes:
    """A sepen low-rank file of these tensors with a correct sha256, whatever their names and shapes."""
    meta = {
        "format": FORMAT,
        "format_version": "2",
        "representation": "low_rank",
        "base_model_id": "m",
        "base_fingerprint": "f" * 64,
        "tensors_sha256": tensors_sha256(factors),
        "metadata": "{}",
        **header,
    }
    return save_safetensors(factors, metadata=meta)


LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({f"{LAYER}.up": torch.ones(8, 2), f"{LAYER}.down": torch.ones(3, 6)}, "factors up [8, 2] and down [3, 6]"),
        ({f"{LAYER}.up": torch.ones(8, 2)}, "its .down factor is missing"),
        ({f"{LAYER}.up": torch.ones(8, 2, 1), f"{LAYER}.down": torch.ones(2, 6)}, "do not fit"),
        ({LAYER: torch.ones(8, 6)}, "is no layer's .up or .down factor"),
    ],
)
def test_factors_that_do_not_fit_are_refused_naming_the_layer(tensors, message):
    data = low_rank_file(tensors)
    for read in (KeyProjectionAdapter.from_bytes, read_adapter_file):
        with pytest.raises(AdapterFormatError, match=re.escape(message)) as raised:
            read(data)
        assert "down_blocks.0.attentions.0" in str(raised.value)


def test_versions_and_representations_are_checked():
    tensors = {f"{LAYER}.up": torch.ones(8, 2), f"{LAYER}.down": torch.ones(2, 6)}
    assert read_adapter_file(low_rank_file(tensors)).factors[LAYER][0].shape == (8, 2)
    cases = [
        ({"format_version": "3"}, "version 3 is not supported .expected 1 or 2."),
        ({"format_version": "1"}, "a low-rank adapter is format version 2"),
        ({"representation": "sparse"}, "representation 'sparse'"),
        ({"base_architecture": "sd3"}, "base_architecture 'sd3'"),
    ]
    for header, message in cases:
        for read in (KeyProjectionAdapter.from_bytes, read_adapter_file):
            with pytest.raises(AdapterFormatError, match=message):
                read(low_rank_file(tensors, **header))
    dense = {LAYER: torch.ones(8, 6)}  # version 2 may hold deltas too
    parsed = read_adapter_file(low_rank_file(dense, representation="delta"))
    assert parsed.representation == "delta" and np.array_equal(parsed.deltas[LAYER], np.ones((8, 6), np.float32))


def test_the_torch_free_reader_reads_low_rank_files(dense):
    low = dense.low_rank(energy=0.9)
    data = low.to_bytes()
    parsed = read_adapter_file(data)
    assert parsed.representation == "low_rank" and parsed.deltas == {} and parsed.layer_names == low.layer_names
    assert parsed.tensors_sha256 == low.sha256 and parsed.stored_dtype == "float16" and parsed.metadata == low.metadata
    for name, (up, down) in low.factors.items():
        assert np.array_equal(parsed.factors[name][0], up.float().numpy())
        assert np.array_equal(parsed.factors[name][1], down.float().numpy())
        assert np.allclose(parsed.delta(name), low.delta(name).float().numpy(), rtol=0, atol=1e-3)
    corrupt = bytearray(data)
    corrupt[-3] ^= 0xFF
    with pytest.raises(AdapterFormatError, match="corrupt"):
        read_adapter_file(bytes(corrupt))
    with pytest.raises(AdapterFormatError, match="corrupt"):
        KeyProjectionAdapter.from_bytes(bytes(corrupt))


def lora_products(export) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    tensors = load(export.data)
    if export.options.format == "full":
        return {k.removesuffix(".diff"): v.astype(np.float64) for k, v in tensors.items()}
    pairs = {}
    for key, value in tensors.items():
        for suffix, slot in ((".lora_up.weight", 0), (".lora_B.weight", 0), (".lora_down.weight", 1)):
            if key.endswith(suffix):
                pairs.setdefault(key.removesuffix(suffix), [None, None])[slot] = value.astype(np.float64)
        if key.endswith(".lora_A.weight"):
            pairs.setdefault(key.removesuffix(".lora_A.weight"), [None, None])[1] = value.astype(np.float64)
    # What a loader adds: alpha / rank * up @ down (kohya's alpha per layer; the diffusers format's alpha is the rank).
    scale = {name: float(tensors[f"{name}.alpha"]) / up.shape[1] if f"{name}.alpha" in tensors else 1.0
             for name, (up, _) in pairs.items()}  # fmt: skip
    return {name: scale[name] * up @ down for name, (up, down) in pairs.items()}


def test_a_kohya_file_of_unequal_ranks_has_one_alpha_and_adds_each_truncated_delta(tiny_model):
    """energy keeps different ranks in different layers; every layer gets the file's one alpha (its most common rank),
    so a loader that reads one alpha for all (diffusers' kohya conversion) scales each layer right."""
    from safetensors.numpy import load

    adapter = spectral_adapter(tiny_model, dtype=torch.float32)
    export = adapter.export("kohya", dtype="fp32", energy=0.9)
    ranks = export.ranks
    assert len(set(ranks.values())) > 1
    alphas = {float(v) for k, v in load(export.data).items() if k.endswith(".alpha")}
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
    assert alphas == {float(common)}
    for name, product in lora_products(export).items():
        layer = next(n for n in adapter.layer_names if kohya_name(n) == name)
        u, s, vh = np.linalg.svd(adapter.delta(layer).double().numpy())
        r = ranks[layer]
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        assert np.linalg.norm(product - truncated) <= 1e-5 * np.linalg.norm(truncated), name


def test_a_diverged_adapter_has_no_low_rank_form(tiny_model):
    adapter = spectral_adapter(tiny_model)
    name = adapter.layer_names[3]
    adapter.deltas[name][0, 0] = float("nan")
    with pytest.raises(AdapterError, match=f"layer {name} holds NaN"):
        adapter.low_rank(rank=2)


@pytest.mark.parametrize(
    ("format", "options"),
    [("kohya", {"rank": 3}), ("diffusers", {"energy": 0.9}), ("kohya", {}), ("full", {})],
)
def test_export_of_a_low_rank_adapter_is_that_of_its_dense_equivalent(tiny_model, format, options):
    low = spectral_adapter(tiny_model, dtype=torch.float32).low_rank(rank=6)  # fp32: no rounding between the two
    ours = low.export(format, dtype="fp32", **options)
    theirs = dense_equivalent(low).export(format, dtype="fp32", **options)
    ours_products, theirs_products = lora_products(ours), lora_products(theirs)
    assert set(ours_products) == set(theirs_products) and len(ours_products) == 16
    for key, product in theirs_products.items():
        assert np.linalg.norm(ours_products[key] - product) <= 1e-5 * np.linalg.norm(product), key
    assert ours.relative_error == pytest.approx(theirs.relative_error, abs=1e-5)
    assert ours.energy_kept == pytest.approx(theirs.energy_kept, abs=1e-5)
    if format == "full" or options:
        assert ours.ranks == theirs.ranks
    else:  # a full-rank LoRA of a rank-6 adapter is rank 6; the dense matrix's other singular values are rounding
        assert set(ours.ranks.values()) == {6} and set(theirs.ranks.values()) == {32}
    for name, layer in ours.layers.items():  # the error, computed without forming Δ, against the exported tensors
        up, down = (t.double().numpy() for t in low.factors[name])
        exported = ours_products[kohya_name(name) if format != "diffusers" else f"unet.{name.removesuffix('.weight')}"]
        expected = np.linalg.norm(exported - up @ down) / np.linalg.norm(up @ down)
        assert layer.relative_error == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_factorise_product_is_the_truncated_svd_of_the_product():
    rng = np.random.default_rng(0)
    up, down = rng.normal(size=(40, 7)), rng.normal(size=(7, 24))
    for rank, energy in ((3, None), (None, 0.8), (None, None), (50, None)):
        a_up, a_down, a_kept = factorise_product(up, down, rank, energy)
        b_up, b_down, b_kept = factorise(up @ down, rank, energy)
        r = a_up.shape[1]
        assert r == min(b_up.shape[1], 7) and a_down.shape == (r, 24) and a_kept == pytest.approx(b_kept)
        product = b_up[:, :r] @ b_down[:r]
        assert np.allclose(a_up @ a_down, product, atol=1e-9 * np.abs(product).max())
        assert np.allclose(np.linalg.norm(a_up, axis=0), np.linalg.norm(a_down, axis=1))  # √S in both factors


# SDXL's 70 key layers (diffusers names): transformer depth 2 in down_blocks.1 and up_blocks.1, 10 elsewhere.
SDXL_BLOCKS = [(f"down_blocks.1.attentions.{a}", 2) for a in range(2)]
SDXL_BLOCKS += [(f"down_blocks.2.attentions.{a}", 10) for a in range(2)] + [("mid_block.attentions.0", 10)]
SDXL_BLOCKS += [(f"up_blocks.0.attentions.{a}", 10) for a in range(3)]
SDXL_BLOCKS += [(f"up_blocks.1.attentions.{a}", 2) for a in range(3)]
SDXL_LAYERS = [f"{b}.transformer_blocks.{t}.attn2.to_k.weight" for b, depth in SDXL_BLOCKS for t in range(depth)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "input_blocks_4_1"),
        ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight", "input_blocks_5_1"),
        ("down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_k.weight", "input_blocks_7_1"),
        ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight", "input_blocks_8_1"),
        ("mid_block.attentions.0.transformer_blocks.5.attn2.to_k.weight", "middle_block_1"),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", "output_blocks_0_1"),
        ("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k.weight", "output_blocks_2_1"),
        ("up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight", "output_blocks_3_1"),
        ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight", "output_blocks_5_1"),
    ],
)
def test_sdxl_layers_get_kohyas_sgm_names(name, expected):
    rest = name.split(".attentions.")[1].split(".", 1)[1].removesuffix(".weight").replace(".", "_")  # after the block
    assert sgm_stride(SDXL_LAYERS) == 3
    assert kohya_name(name, "sdxl", 3) == f"lora_unet_{expected}_{rest}"
    assert kohya_name(name) == "lora_unet_" + name.removesuffix(".weight").replace(".", "_")  # SD: as before


def test_sdxl_exports_use_sgm_names_and_keep_diffusers_paths():
    generator = torch.Generator().manual_seed(0)
    deltas = {name: 0.01 * torch.randn(4, 6, generator=generator, dtype=torch.float16) for name in SDXL_LAYERS}
    adapter = KeyProjectionAdapter(deltas, "sdxl-base", "f" * 64, {"name": "xl"}, base_architecture="sdxl")
    for stored in (adapter, adapter.low_rank(rank=2)):
        data = stored.to_bytes()
        assert safetensors_metadata(data)["base_architecture"] == "sdxl"
        assert KeyProjectionAdapter.from_bytes(data).base_architecture == "sdxl"
        assert read_adapter_file(data).base_architecture == "sdxl"
        kohya = stored.export("kohya", rank=2)
        networks = {key.split(".", 1)[0] for key in json_keys(kohya.data)}
        assert len(networks) == 70 and all(n.endswith("_attn2_to_k") for n in networks)
        blocks = {n.removeprefix("lora_unet_").split("_transformer_blocks_")[0] for n in networks}
        assert blocks == {f"input_blocks_{i}_1" for i in (4, 5, 7, 8)} | {"middle_block_1"} | {
            f"output_blocks_{i}_1" for i in range(6)
        }
        assert "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_k" in networks
        full = {key.removesuffix(".diff") for key in json_keys(stored.export("full").data)}
        assert full == networks
        diffusers = {key.split(".lora_")[0] for key in json_keys(stored.export("diffusers").data)}
        assert diffusers == {f"unet.{n.removesuffix('.weight')}" for n in SDXL_LAYERS}
        header = safetensors_metadata(kohya.data)
        assert header["sepen.base_architecture"] == "sdxl"


def json_keys(data: bytes) -> list[str]:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return [k for k in header if k != "__metadata__"]


def test_the_architecture_comes_from_the_model(tiny_model):
    def stand_in(**extra):
        fields = ("unet", "base_keys", "model_id", "base_fingerprint")
        return SimpleNamespace(**{f: getattr(tiny_model, f) for f in fields}, **extra)

    assert KeyProjectionAdapter.from_model(tiny_model).base_architecture == "sd"
    assert KeyProjectionAdapter.from_model(stand_in()).base_architecture == "sd"  # a model without the property
    xl = KeyProjectionAdapter.from_model(stand_in(architecture="sdxl"))
    assert xl.base_architecture == "sdxl" and safetensors_metadata(xl.to_bytes())["base_architecture"] == "sdxl"
    assert safetensors_metadata(xl.export("kohya", rank=1).data)["sepen.base_architecture"] == "sdxl"


def sepen(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sepen_core.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_finetune_rank_and_energy(tmp_path):
    common = ("finetune", "--model", "tiny", "--pair", "cat", "dog", "--steps", "1", "--batch-size", "1")
    run = sepen(*common, "--rank", "2", "--out", "cd.safetensors", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    adapter = KeyProjectionAdapter.load(tmp_path / "cd.safetensors")
    assert adapter.is_low_rank and adapter.metadata["recipe"]["rank"] == 2 and adapter.metadata["storage"]["rank"] == 2
    run = sepen(*common, "--energy", "1.5", "--out", "x.safetensors", cwd=tmp_path)
    assert run.returncode == 2 and "energy: must be a fraction in (0, 1]" in run.stderr, run.stderr
    run = sepen(*common, "--rank", "2", "--energy", "0.5", "--out", "x.safetensors", cwd=tmp_path)
    assert run.returncode == 2 and "energy: give rank or energy, not both" in run.stderr, run.stderr
    assert not (tmp_path / "x.safetensors").exists()
