"""Export a sepen adapter in the forms other tools load: a diffusers/PEFT LoRA, a kohya LoRA, or the full-rank delta.

    diffusers  unet.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r): PEFT's keys, which
               `StableDiffusionPipeline.load_lora_weights` loads; per-layer ranks and alphas in `lora_adapter_metadata`
    kohya      <network>.lora_down.weight (r, in), .lora_up.weight (out, r) and .alpha: what ComfyUI, A1111 and
               diffusers load as a LoRA
    full       <network>.diff (out, in): the delta itself, ComfyUI's and A1111's full-rank difference

<module> is the diffusers module path, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k; <network> is
kohya's name of it (kohya_name): lora_unet_<module with _> for SD, the original SGM UNet's names for SDXL. A LoRA is the
truncated SVD of each layer's delta: with Δ = U S Vᵀ, up = U_r √S_r and down = √S_r V_rᵀ, and alpha = r (diffusers;
a kohya file has one alpha for all layers, its most common rank, and each up factor carries r / alpha), so what a
loader adds, alpha / rank · up @ down, is exactly the truncated delta at strength 1.0. The rank is fixed (`rank`,
capped at each matrix's smaller side), the smallest keeping a fraction `energy` of the squared singular values per
layer, or full.
An adapter stored low-rank (Δ = up @ down, rank r) is factorised without forming Δ (factorise_product), so its LoRA
has at most rank r. The header carries sepen's record (base model id, architecture and fingerprint, concepts,
recipe...) and what the export kept.

Torch-free, numpy alone (the safetensors file is written here, the same bytes for the same input), so the gateway
converts a stored version on download (docs/interop.md).
"""

from __future__ import annotations

import json
import re
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


def factorise_product(
    up: np.ndarray, down: np.ndarray, rank: int | None, energy: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """factorise() of Δ = up (out, k) @ down (k, in) without forming Δ: the exact truncated SVD through the QR of each
    factor and the SVD of a k x k core. With up = Q_u R_u and downᵀ = Q_d R_d, Δ = Q_u (R_u R_dᵀ) Q_dᵀ, so the SVD
    R_u R_dᵀ = U' S V'ᵀ gives Δ's: U = Q_u U', V = Q_d V'. Δ has rank at most k, and so has the result."""
    q_up, r_up = np.linalg.qr(up.astype(np.float64))  # (out, k'), (k', k)
    q_down, r_down = np.linalg.qr(down.astype(np.float64).T)  # (in, k''), (k'', k)
    u, singular, vt = np.linalg.svd(r_up @ r_down.T)  # the core (k', k''): (k', m), (m,), (m, k'')
    r = lora_rank(singular, rank, energy)
    squares = singular**2
    total = float(squares.sum())
    kept = float(squares[:r].sum() / total) if total > 0 else 1.0
    root = np.sqrt(singular[:r])
    return (q_up @ u[:, :r]) * root[None, :], root[:, None] * (vt[:r] @ q_down.T), min(kept, 1.0)


def module_path(name: str) -> str:
    """'down_blocks.1...attn2.to_k.weight' -> 'down_blocks.1...attn2.to_k'."""
    return name.removesuffix(KEY_SUFFIX)


_SGM_BLOCKS = (  # diffusers' UNet blocks -> the SGM UNet's, of an SDXL-style UNet with `stride` blocks per level
    (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), lambda b, a, s: f"input_blocks_{1 + b * s + a}_1"),
    (re.compile(r"mid_block\.attentions\.(0)\.(.+)"), lambda a, s: "middle_block_1"),
    (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), lambda b, a, s: f"output_blocks_{b * s + a}_1"),
)


def kohya_name(name: str, architecture: str = "sd", stride: int = 3) -> str:
    """kohya's network name of a key layer (its state-dict name), under which the kohya and full formats store it.

    "sd": "lora_unet_" + the diffusers module path with "." -> "_" ('down_blocks.1.attentions.0...attn2.to_k.weight'
    -> 'lora_unet_down_blocks_1_attentions_0_..._attn2_to_k'), what kohya's sd-scripts writes for SD 1.x and 2.x.
    "sdxl": the original SGM UNet's module names, what sd-scripts writes for SDXL: down_blocks.{b}.attentions.{a}
    -> input_blocks_{1 + b*stride + a}_1, mid_block.attentions.0 -> middle_block_1, up_blocks.{b}.attentions.{a}
    -> output_blocks_{b*stride + a}_1, each followed by the rest of the path ('down_blocks.1.attentions.0.
    transformer_blocks.0.attn2.to_k.weight' -> 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k').
    `stride` is the number of resnets per up block, 1 + layers_per_block (sgm_stride; SDXL: 3).

    Who reads which: A1111's Lora extension and ComfyUI read both the diffusers-style and the SGM names for SDXL (and
    the diffusers-style ones for SD), diffusers' load_lora_weights converts both to its own; the SGM names are the
    ones SDXL LoRAs in the wild carry. The diffusers format keeps unet.<module path> for either architecture."""
    path = module_path(name)
    if architecture == "sd":
        return "lora_unet_" + path.replace(".", "_")
    for pattern, block in _SGM_BLOCKS:
        match = pattern.fullmatch(path)
        if match:
            *indices, rest = match.groups()
            return f"lora_unet_{block(*(int(i) for i in indices), stride)}_{rest.replace('.', '_')}"
    raise AdapterFormatError(f"layer {path} has no SGM UNet name: not an attention layer of a down, mid or up block")


def sgm_stride(names) -> int:
    """The SGM block stride of a UNet with these key layers: attentions per up block (max index + 1; SDXL: 3)."""
    indices = [int(m.group(1)) for m in map(re.compile(r"up_blocks\.\d+\.attentions\.(\d+)\.").match, names) if m]
    return max(indices) + 1 if indices else 3


def export_adapter(
    data: bytes, format: str, *, rank: int | None = None, energy: float | None = None, dtype: str = "fp16"
) -> Export:
    """The sepen adapter file `data` as a `format` file (see the module's docstring). Raises ConfigError for a bad
    option (its `field` names it) and AdapterFormatError when `data` is not a sepen adapter."""
    options = ExportOptions(format, rank, energy, dtype)
    adapter = read_adapter_file(data)
    out_dtype = EXPORT_DTYPES[dtype]
    stride = sgm_stride(adapter.layer_names)
    stored: dict[str, tuple[np.ndarray, ...]] = {}  # (up, down) or (delta,)
    written: dict[str, tuple[np.ndarray, ...]] = {}  # (up, down) or (diff,), in the export's dtype
    kept: dict[str, float] = {}
    for name in adapter.layer_names:
        stored[name] = adapter.factors.get(name) or (adapter.deltas[name],)
        if not all(np.isfinite(t).all() for t in stored[name]):
            raise AdapterFormatError(f"layer {module_path(name)} holds NaN or infinite values: nothing to export")
        if options.format == "full":
            written[name], kept[name] = (_dense(stored[name]).astype(out_dtype),), 1.0
            continue
        if len(stored[name]) == 2:  # stored low-rank: factorised without forming Δ
            up, down, kept[name] = factorise_product(*stored[name], options.rank, options.energy)
        else:
            up, down, kept[name] = factorise(stored[name][0], options.rank, options.energy)
        written[name] = (up, down)
    ranks = {name: min(t[0].shape) if len(t) == 1 else t[0].shape[1] for name, t in written.items()}
    # kohya files get one alpha for every layer, and each layer's up factor carries rank / alpha: every loader's
    # scale alpha / rank then gives back the truncated delta, even one that reads only a single alpha for all layers
    # (diffusers' kohya conversion mis-keys per-layer alphas, so unequal ranks would be scaled wrongly).
    alpha = _common(ranks.values()) if options.format == "kohya" else None
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, LayerExport] = {}
    error_sq = norm_sq = kept_sq = 0.0
    for name, parts in written.items():
        r, network = ranks[name], kohya_name(name, adapter.base_architecture, stride)
        if options.format == "full":
            tensors[f"{network}.diff"] = parts[0]
            restored: tuple[np.ndarray, ...] = (parts[0],)
        else:
            up, down = parts
            if alpha is not None:
                up = up * (r / alpha)
            up, down = up.astype(out_dtype), down.astype(out_dtype)
            if options.format == "diffusers":
                tensors[f"unet.{module_path(name)}.lora_A.weight"] = down
                tensors[f"unet.{module_path(name)}.lora_B.weight"] = up
            else:
                tensors[f"{network}.lora_down.weight"] = down
                tensors[f"{network}.lora_up.weight"] = up
                tensors[f"{network}.alpha"] = np.asarray(alpha, dtype=out_dtype)
            # What a loader adds: (alpha / r) up @ down, from the stored tensors after their dtype's rounding.
            restored = (up.astype(np.float64) * (alpha / r if alpha is not None else 1.0), down)
        layer_norm_sq, layer_error_sq = _difference_sq(restored, stored[name])
        error_sq, norm_sq = error_sq + layer_error_sq, norm_sq + layer_norm_sq
        kept_sq += kept[name] * layer_norm_sq
        layers[name] = LayerExport(r, kept[name], _ratio(layer_error_sq, layer_norm_sq))
    export = Export(b"", options, layers, _ratio(error_sq, norm_sq), kept_sq / norm_sq if norm_sq > 0 else 1.0)
    return replace(export, data=safetensors_bytes(tensors, _header(adapter, export, alpha)))


def _common(ranks) -> int:
    """The most common rank (the larger of equally common ones)."""
    counts = Counter(ranks)
    return max(counts, key=lambda r: (counts[r], r))


def _dense(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    """A layer's delta in float64, from (delta,) or (up, down)."""
    return parts[0].astype(np.float64) if len(parts) == 1 else _product(*parts)


def _difference_sq(restored: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...]) -> tuple[float, float]:
    """(||reference||², ||restored - reference||²), each given as (dense,) or (up, down); two factored matrices are
    compared through r x r products, neither formed."""
    if len(restored) == 2 and len(reference) == 2:
        return _factored_difference_sq(restored, reference)
    return _dense_difference_sq(_dense(restored), _dense(reference))


def _product(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return up.astype(np.float64) @ down.astype(np.float64)


def _inner(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """<A, B>_F of A = a_up @ a_down and B = b_up @ b_down: tr(A_downᵀ A_upᵀ B_up B_down), through r x r matrices."""
    (a_up, a_down), (b_up, b_down) = [(u.astype(np.float64), d.astype(np.float64)) for u, d in (a, b)]
    return float(np.sum((a_up.T @ b_up) * (a_down @ b_down.T)))


def _dense_difference_sq(restored: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(||reference||², ||restored - reference||²), float64."""
    return float((reference**2).sum()), float(((restored - reference) ** 2).sum())


def _factored_difference_sq(
    restored: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """_dense_difference_sq of two matrices given as factors (up, down), through r x r matrices: neither is formed."""
    norm_sq = _inner(reference, reference)
    error_sq = _inner(restored, restored) - 2 * _inner(restored, reference) + norm_sq
    return max(norm_sq, 0.0), max(error_sq, 0.0)


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


def _header(adapter: AdapterFile, export: Export, alpha: int | None = None) -> dict[str, str]:
    """sepen's record under `sepen.*`, what the export kept, and each format's own entries."""
    options, ranks = export.options, export.ranks
    header = {
        "format": "pt",  # what safetensors files of torch weights declare; diffusers writes it too
        "sepen.export": options.format,
        "sepen.base_model_id": adapter.base_model_id,
        "sepen.base_architecture": adapter.base_architecture,
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
            ss_network_alpha=str(alpha),
            ss_output_name=str(adapter.metadata.get("name", "sepen-adapter")),
        )
    return header


def _lora_config(ranks: dict[str, int]) -> dict:
    """PEFT LoraConfig fields, prefixed 'unet.' as diffusers stores them: each layer's rank, alpha = rank (scale 1).
    A pattern key starting with '^' matches from the start of a module's name (PEFT's rule), so no layer catches
    another whose name ends the same."""
    common = _common(ranks.values())
    pattern = {f"^{module_path(name)}": r for name, r in ranks.items() if r != common}
    return {
        "unet.r": common,
        "unet.lora_alpha": common,
        "unet.rank_pattern": pattern,
        "unet.alpha_pattern": dict(pattern),
        "unet.target_modules": sorted(module_path(name) for name in ranks),
    }
