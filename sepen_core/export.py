"""Export a sepen adapter in the forms other tools load: a diffusers/PEFT LoRA, a kohya LoRA, or the full-rank delta.

    diffusers  unet.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r): PEFT's keys, which
               `StableDiffusionPipeline.load_lora_weights` loads; per-layer ranks and alphas in `lora_adapter_metadata`
    kohya      lora_unet_<module with _>.lora_down.weight (r, in), .lora_up.weight (out, r) and .alpha: what ComfyUI,
               A1111 and diffusers load as a LoRA
    full       lora_unet_<module with _>.diff (out, in): the delta itself, ComfyUI's and A1111's full-rank difference

<module> is the diffusers module path, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k. A LoRA is the
truncated SVD of each layer's delta: with Δ = U S Vᵀ, up = U_r √S_r and down = √S_r V_rᵀ, and alpha = r, so a loader's
scale (alpha / rank) is 1 and strength 1.0 adds exactly the truncated delta. The rank is fixed (`rank`, capped at each
matrix's smaller side), the smallest keeping a fraction `energy` of the squared singular values per layer, or full.
The header carries sepen's record (base model id and fingerprint, concepts, recipe...) and what the export kept.

Torch-free, numpy alone (the safetensors file is written here, the same bytes for the same input), so the gateway
converts a stored version on download (docs/interop.md).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from sepen_core.adapter_file import AdapterFile, read_adapter_file
from sepen_core.config import ExportOptions
from sepen_core.errors import AdapterFormatError

EXPORT_DTYPES = {"fp16": np.float16, "fp32": np.float32}  # config.EXPORT_DTYPE_NAMES
KEY_SUFFIX = ".weight"
# diffusers reads a LoRA's LoraConfig from this header entry (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LayerExport:
    """One key layer as exported: its rank, the share of squared singular values kept, the relative error of what
    a loader adds at strength 1.0 (from the stored tensors, after their dtype's rounding) against sepen's delta."""

    rank: int
    energy_kept: float
    relative_error: float


@dataclass(frozen=True)
class Export:
    data: bytes  # the safetensors file
    options: ExportOptions
    layers: dict[str, LayerExport]  # by sepen's state-dict name
    relative_error: float  # ||Δ̂ - Δ||_F / ||Δ||_F over all layers together
    energy_kept: float  # kept squared singular values / all, over all layers together

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return (
            f"{self.options.format}: {len(self.layers)} layers, rank {span}, energy kept {self.energy_kept:.6f}, "
            f"relative Frobenius error {self.relative_error:.2e}"
        )


def lora_rank(singular_values: np.ndarray, rank: int | None, energy: float | None) -> int:
    """The rank to keep of a matrix with these (descending) singular values: `rank` capped at their number, the
    smallest keeping a share `energy` of their squares, or all of them; at least 1."""
    count = len(singular_values)
    if rank is not None:
        return max(1, min(rank, count))
    if energy is None:
        return count
    squares = singular_values.astype(np.float64) ** 2
    total = squares.sum()
    if total == 0:
        return 1
    kept = np.cumsum(squares) / total  # (count,)
    return int(min(count, np.searchsorted(kept, energy, side="left") + 1))


def factorise(delta: np.ndarray, rank: int | None, energy: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(up (out, r), down (r, in), share of squared singular values kept): the rank-r truncated SVD of `delta`, its
    best rank-r approximation, each factor carrying √S. The singular vectors are the eigenvectors of the smaller Gram
    matrix (Δᵀ Δ or Δ Δᵀ): the same to float64 rounding as np.linalg.svd's, in less than half its time."""
    d = delta.astype(np.float64)
    tall = d.shape[0] >= d.shape[1]
    eigenvalues, vectors = np.linalg.eigh(d.T @ d if tall else d @ d.T)  # ascending; (k,), (k, k), k = min(out, in)
    singular = np.sqrt(np.clip(eigenvalues[::-1], 0, None))
    r = lora_rank(singular, rank, energy)
    basis = vectors[:, ::-1][:, :r]  # the top r right (tall) or left singular vectors
    total = float((d**2).sum())
    kept = float((singular[:r] ** 2).sum() / total) if total > 0 else 1.0
    root = np.sqrt(singular[:r])
    root = np.where(root > 0, root, 1.0)
    if tall:
        return (d @ basis) / root[None, :], root[:, None] * basis.T, min(kept, 1.0)  # Δ V = U S
    return basis * root[None, :], (basis.T @ d) / root[:, None], min(kept, 1.0)  # Uᵀ Δ = S Vᵀ


def module_path(name: str) -> str:
    """'down_blocks.1...attn2.to_k.weight' -> 'down_blocks.1...attn2.to_k'."""
    return name.removesuffix(KEY_SUFFIX)


def kohya_name(name: str) -> str:
    """'down_blocks.1.attentions.0...attn2.to_k.weight' -> 'lora_unet_down_blocks_1_attentions_0_..._attn2_to_k'."""
    return "lora_unet_" + module_path(name).replace(".", "_")


def export_adapter(
    data: bytes, format: str, *, rank: int | None = None, energy: float | None = None, dtype: str = "fp16"
) -> Export:
    """The sepen adapter file `data` as a `format` file (see the module's docstring). Raises ConfigError for a bad
    option (its `field` names it) and AdapterFormatError when `data` is not a sepen adapter."""
    options = ExportOptions(format, rank, energy, dtype)
    adapter = read_adapter_file(data)
    out_dtype = EXPORT_DTYPES[dtype]
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, LayerExport] = {}
    error_sq = norm_sq = kept_sq = 0.0
    for name, delta in sorted(adapter.deltas.items()):
        if not np.isfinite(delta).all():
            raise AdapterFormatError(f"layer {module_path(name)} holds NaN or infinite values: nothing to export")
        reference = delta.astype(np.float64)
        if options.format == "full":
            diff = delta.astype(out_dtype)
            tensors[f"{kohya_name(name)}.diff"] = diff
            restored, r, kept = diff.astype(np.float64), min(delta.shape), 1.0
        else:
            up, down, kept = factorise(delta, options.rank, options.energy)
            up, down = up.astype(out_dtype), down.astype(out_dtype)
            r = up.shape[1]
            if options.format == "diffusers":
                tensors[f"unet.{module_path(name)}.lora_A.weight"] = down
                tensors[f"unet.{module_path(name)}.lora_B.weight"] = up
            else:
                tensors[f"{kohya_name(name)}.lora_down.weight"] = down
                tensors[f"{kohya_name(name)}.lora_up.weight"] = up
                tensors[f"{kohya_name(name)}.alpha"] = np.asarray(r, dtype=out_dtype)  # alpha / rank = 1
            restored = up.astype(np.float64) @ down.astype(np.float64)
        layer_norm_sq = float((reference**2).sum())
        layer_error_sq = float(((restored - reference) ** 2).sum())
        error_sq, norm_sq, kept_sq = error_sq + layer_error_sq, norm_sq + layer_norm_sq, kept_sq + kept * layer_norm_sq
        layers[name] = LayerExport(r, kept, _ratio(layer_error_sq, layer_norm_sq))
    export = Export(b"", options, layers, _ratio(error_sq, norm_sq), kept_sq / norm_sq if norm_sq > 0 else 1.0)
    return replace(export, data=safetensors_bytes(tensors, _header(adapter, export)))


_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte for byte the same for the same input: tensors in name order, the header's keys
    sorted (the safetensors library writes its metadata in hash order, which differs from call to call)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def _ratio(error_sq: float, norm_sq: float) -> float:
    return float(np.sqrt(error_sq / norm_sq)) if norm_sq > 0 else float(np.sqrt(error_sq))


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _header(adapter: AdapterFile, export: Export) -> dict[str, str]:
    """sepen's record under `sepen.*`, what the export kept, and each format's own entries."""
    options, ranks = export.options, export.ranks
    header = {
        "format": "pt",  # what safetensors files of torch weights declare; diffusers writes it too
        "sepen.export": options.format,
        "sepen.base_model_id": adapter.base_model_id,
        "sepen.base_fingerprint": adapter.base_fingerprint,
        "sepen.adapter_sha256": adapter.tensors_sha256,
        **{f"sepen.{key}": _text(value) for key, value in adapter.metadata.items() if key != "summary"},
        "sepen.rank": str(options.rank) if options.rank is not None else "full",
        "sepen.energy": "" if options.energy is None else f"{options.energy:g}",
        "sepen.energy_kept": f"{export.energy_kept:.6f}",
        "sepen.relative_error": f"{export.relative_error:.3e}",
        "sepen.layers": json.dumps(
            {
                module_path(name): {"rank": layer.rank, "energy_kept": round(layer.energy_kept, 6)}
                for name, layer in export.layers.items()
            },
            sort_keys=True,
        ),
        "sepen.dtype": options.dtype,
    }
    if options.format == "diffusers":
        header[DIFFUSERS_METADATA_KEY] = json.dumps(_lora_config(ranks), sort_keys=True)
    elif options.format == "kohya":
        uniform = len(set(ranks.values())) == 1
        dim = str(next(iter(ranks.values()))) if uniform else "Dynamic"  # kohya's word for per-layer ranks
        header.update(
            ss_network_module="networks.lora",
            ss_network_dim=dim,
            ss_network_alpha=dim,
            ss_output_name=str(adapter.metadata.get("name", "sepen-adapter")),
        )
    return header


def _lora_config(ranks: dict[str, int]) -> dict:
    """PEFT LoraConfig fields, prefixed 'unet.' as diffusers stores them: each layer's rank, alpha = rank (scale 1).
    A pattern key starting with '^' matches from the start of a module's name (PEFT's rule), so no layer catches
    another whose name ends the same."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{module_path(name)}": r for name, r in ranks.items() if r != common}
    return {
        "unet.r": common,
        "unet.lora_alpha": common,
        "unet.rank_pattern": pattern,
        "unet.alpha_pattern": dict(pattern),
        "unet.target_modules": sorted(module_path(name) for name in ranks),
    }
