"""Key-projection adapters: the finetuned `attn2.to_k` matrices as safetensors with metadata
(METHOD.md section 3, ARCHITECTURE.md "Adapters").

The file holds, per layer, the difference from the base model's key weight (fp16 by default:
a delta keeps untouched layers exactly at the base, and allows a strength `scale`), plus string
metadata: format version, base model id and architecture, the base keys' fingerprint, concepts, recipe, steps,
seed, any caller fields (job id...), and the sha256 of the tensors. Loading onto a model whose
base keys differ is an AdapterMismatchError. Nothing is ever unpickled.

An adapter may store each delta low-rank instead (`low_rank()`, or a recipe's `rank` or `energy`): the truncated SVD
as factors up (out, r) @ down (r, in), so an SDXL adapter stays small (a full-rank SDXL key delta is ~340 MB in fp16);
sepen_core.adapter_file describes both representations in the file.

An adapter applies beside LoRAs that PEFT holds in the same UNet (`pipe.load_lora_weights`, before or after): it
changes the key layers' own weights, which PEFT keeps as each LoRA layer's base layer, and `remove()` puts them back.
`export()` writes it as a diffusers or kohya LoRA or a full-rank delta (sepen_core.export).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sepen_core.adapter_file import (
    FORMAT,
    FORMAT_VERSION,
    LOW_RANK_FORMAT_VERSION,
    check_header,
    factor_layers,
    safetensors_metadata,
)
from sepen_core.config import check_low_rank
from sepen_core.errors import AdapterError, AdapterFormatError, AdapterMismatchError
from sepen_core.export import Export, export_adapter, lora_rank
from sepen_core.model_card import ARCHITECTURES
from sepen_core.models import BaseModel, key_fingerprint, key_projection_weights


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class KeyProjectionAdapter:
    """Per-layer deltas of the cross-attention key weights, keyed by state-dict name
    (e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'), and their metadata.
    A low-rank adapter holds each delta as `factors` instead, and no `deltas`: use delta(name) for either."""

    deltas: dict[str, torch.Tensor]
    base_model_id: str
    base_fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)  # concepts, recipe, steps, seed, job_id...
    # Low-rank storage (low_rank()): by state-dict name, up (out, r) and down (r, in), delta = up @ down.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    base_architecture: str = "sd"  # the base model's (BaseModel.architecture): "sd" or "sdxl"; export names by it
    # What apply() changed, by UNet, so that remove() can put it back.
    _applied: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if self.deltas and self.factors:
            raise AdapterError("an adapter holds its layers as deltas or as factors, not both")
        if self.base_architecture not in ARCHITECTURES:
            raise AdapterError(f"base_architecture {self.base_architecture!r} is not one of {ARCHITECTURES}")

    def __getstate__(self) -> dict[str, Any]:  # pickle and copy: what apply() changed stays with the original
        return {key: value for key, value in self.__dict__.items() if key != "_applied"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _applied=weakref.WeakKeyDictionary())

    @classmethod
    def from_model(
        cls, model: BaseModel, metadata: dict[str, Any] | None = None, *, dtype: torch.dtype = torch.float16
    ) -> KeyProjectionAdapter:
        """Capture the difference between the model's current key weights and its base keys."""
        params = key_projection_weights(model.unet)
        deltas = {
            name: (params[name].detach().float() - base.float()).to("cpu", dtype)
            for name, base in model.base_keys.items()
        }
        architecture = getattr(model, "architecture", "sd")
        return cls(deltas, model.model_id, model.base_fingerprint, dict(metadata or {}), base_architecture=architecture)

    @property
    def is_low_rank(self) -> bool:
        return bool(self.factors)

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.factors or self.deltas)

    def delta(self, name: str) -> torch.Tensor:
        """Layer `name`'s delta (out, in) in the stored dtype: the stored one, or up @ down (in fp32, then rounded)."""
        if name in self.factors:
            up, down = self.factors[name]
            return (up.float() @ down.float()).to(up.dtype)
        return self.deltas[name]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the file, by their names there: the deltas, or each layer's `<name>.up` and `<name>.down`."""
        if not self.factors:
            return self.deltas
        tensors = {}
        for name, (up, down) in self.factors.items():
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up, down
        return tensors

    @property
    def sha256(self) -> str:
        return tensors_sha256(self.stored_tensors())

    @property
    def num_parameters(self) -> int:
        """How many numbers the adapter stores: its deltas' entries, or a low-rank adapter's factors'."""
        return sum(t.numel() for t in self.stored_tensors().values())

    def low_rank(
        self, rank: int | None = None, energy: float | None = None, *, device: torch.device | str | None = None
    ) -> KeyProjectionAdapter:
        """A copy storing each layer's delta as its truncated SVD, up = U_r √S_r (out, r) and down = √S_r V_rᵀ (r, in),
        in the stored dtype: rank `rank` (capped at the matrix's smaller side), the smallest keeping a share `energy`
        of the squared singular values per layer (sepen_core.export.lora_rank), or full. The SVD runs in fp32 on
        `device` (default: where the deltas are; a GPU is much faster for SDXL's layers). The copy's metadata
        records what was kept under "storage". ConfigError naming `rank` or `energy` for a bad value."""
        check_low_rank(rank, energy)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        norm_sq = kept_sq = error_sq = 0.0
        for name in self.layer_names:
            stored = self.delta(name)
            if not torch.isfinite(stored).all():
                raise AdapterError(f"layer {name} holds NaN or infinite values: it has no low-rank form")
            delta = stored.to(device if device is not None else stored.device, torch.float32)
            u, singular, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
            r = lora_rank(singular.cpu().numpy(), rank, energy)
            root = singular[:r].sqrt()
            up, down = u[:, :r] * root[None, :], root[:, None] * vh[:r]  # (out, r), (r, in)
            up, down = up.to(stored.dtype), down.to(stored.dtype)  # what the file holds
            squares = singular.double() ** 2
            norm_sq += float(squares.sum())
            kept_sq += float(squares[:r].sum())
            error_sq += float(((up.float() @ down.float() - delta).double() ** 2).sum())
            factors[name] = (up.to(stored.device), down.to(stored.device))
        storage = {
            "rank": rank,
            "energy": energy,
            "energy_kept": round(kept_sq / norm_sq, 6) if norm_sq > 0 else 1.0,
            "relative_error": float(f"{(error_sq / norm_sq if norm_sq > 0 else error_sq) ** 0.5:.4g}"),
        }
        return KeyProjectionAdapter(
            {},
            self.base_model_id,
            self.base_fingerprint,
            {**self.metadata, "storage": storage},
            factors,
            self.base_architecture,
        )

    # -- bytes and files ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {
            "format": FORMAT,
            "format_version": str(LOW_RANK_FORMAT_VERSION if self.factors else FORMAT_VERSION),
            "representation": "low_rank" if self.factors else "delta",
            "base_model_id": self.base_model_id,
            "base_fingerprint": self.base_fingerprint,
            "tensors_sha256": self.sha256,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        if self.base_architecture != "sd":  # absent means "sd": an SD adapter's dense file keeps its earlier bytes
            header["base_architecture"] = self.base_architecture
        tensors = {name: t.contiguous() for name, t in self.stored_tensors().items()}
        return save_safetensors(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyProjectionAdapter:
        try:
            tensors = load_safetensors(data)
            header = safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"not a safetensors file: {exc}") from exc
        representation = check_header(header)
        deltas, factors = tensors, {}
        if representation == "low_rank":
            layers = factor_layers({name: tuple(t.shape) for name, t in tensors.items()})
            deltas, factors = {}, {layer: (tensors[f"{layer}.up"], tensors[f"{layer}.down"]) for layer in layers}
        try:
            adapter = cls(
                deltas,
                header["base_model_id"],
                header["base_fingerprint"],
                json.loads(header.get("metadata", "{}")),
                factors,
                header.get("base_architecture", "sd"),
            )
        except (KeyError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"the adapter's header lacks or garbles {exc}") from exc
        if adapter.sha256 != header.get("tensors_sha256"):
            raise AdapterFormatError("adapter tensors do not match their recorded sha256: the file is corrupt")
        return adapter

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyProjectionAdapter:
        return cls.from_bytes(Path(path).read_bytes())

    def export(
        self, format: str, *, rank: int | None = None, energy: float | None = None, dtype: str = "fp16"
    ) -> Export:
        """This adapter as a diffusers or kohya LoRA or a full-rank delta (sepen_core.export.export_adapter)."""
        return export_adapter(self.to_bytes(), format, rank=rank, energy=energy, dtype=dtype)

    # -- applying ------------------------------------------------------------------------------
    def check_compatible(self, unet, fingerprint: str | None = None) -> None:
        """Raise AdapterMismatchError unless the adapter was trained on this UNet's base keys
        (`fingerprint` of the base keys if known, else computed from the UNet's current keys)."""
        weights = key_projection_weights(unet)
        if self.layer_names != list(weights):
            raise AdapterMismatchError(
                f"adapter for {self.base_model_id!r} has {len(self.layer_names)} key layers; "
                f"this model has {len(weights)} with other names"
            )
        if fingerprint is None:
            fingerprint = key_fingerprint(weights)
        if fingerprint != self.base_fingerprint:
            raise AdapterMismatchError(
                f"adapter was trained on base model {self.base_model_id!r} "
                f"(key fingerprint {self.base_fingerprint[:12]}); this model's base keys differ "
                "(another sepen adapter applied, or a LoRA fused into them: remove or unfuse it first)"
            )

    def apply(self, target, scale: float = 1.0) -> None:
        """Add the deltas to a BaseModel, a UNet2DConditionModel or a diffusers StableDiffusionPipeline,
        in place. The target must hold its base keys (check_compatible verifies it); LoRAs that PEFT holds
        unfused in it may stay, before or after. remove() undoes it."""
        unet = _unet_of(target)
        base_keys = target.base_keys if isinstance(target, BaseModel) else None
        self.check_compatible(unet, target.base_fingerprint if base_keys is not None else None)
        weights = key_projection_weights(unet)
        originals = base_keys if base_keys is not None else {n: w.detach().clone() for n, w in weights.items()}
        with torch.no_grad():
            for name in self.layer_names:
                weights[name].copy_(_with_delta(originals[name], self.delta(name), scale, weights[name].dtype))
        self._applied[unet] = (originals, scale)

    def key_weights(self, model: BaseModel, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The key weights apply() would write into the model, by state-dict name, without writing them (a batch
        of several adapters uses each one's keys side by side: sepen_core.sampling.generate_batch)."""
        self.check_compatible(model.unet, model.base_fingerprint)
        return {
            name: _with_delta(base, self.delta(name), scale, base.dtype).to(model.device)
            for name, base in model.base_keys.items()
        }

    def remove(self, target) -> None:
        """Undo apply(): each key weight is again exactly what it was before. Where something changed a weight
        since (a LoRA fused into it), only this adapter's delta is taken out and that change stays."""
        unet = _unet_of(target)
        if unet not in self._applied:
            raise AdapterError(f"adapter for {self.base_model_id!r} is not applied to this model; nothing to remove")
        originals, scale = self._applied.pop(unet)
        weights = key_projection_weights(unet)
        with torch.no_grad():
            for name in self.layer_names:
                weight, original = weights[name], originals[name]
                ours = _with_delta(original, self.delta(name), scale, weight.dtype)  # what apply() wrote
                if _equal_within_rounding(weight, ours):
                    weight.copy_(original.to(weight.dtype))
                else:
                    weight.copy_((weight.float() - (ours.float() - original.float())).to(weight.dtype))

    @contextmanager
    def applied(self, target, scale: float = 1.0):
        """Apply for the duration of a block, then remove."""
        self.apply(target, scale)
        try:
            yield target
        finally:
            self.remove(target)


def _unet_of(target):
    return target.unet if hasattr(target, "unet") else target


def _with_delta(base: torch.Tensor, delta: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (base.float() + scale * delta.to(base.device).float()).to(dtype)


def _equal_within_rounding(weight: torch.Tensor, expected: torch.Tensor) -> bool:
    """True when `weight` is `expected` up to a few roundings of its dtype (PEFT's fuse then unfuse leaves those)."""
    tolerance = 4 * torch.finfo(weight.dtype).eps * float(expected.abs().max())
    return bool(((weight.float() - expected.float()).abs() <= tolerance).all())


def restore_base_keys(model: BaseModel) -> None:
    params = key_projection_weights(model.unet)
    with torch.no_grad():
        for name, base in model.base_keys.items():
            params[name].copy_(base)
