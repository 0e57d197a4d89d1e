"""Key-projection adapters: the finetuned `attn2.to_k` matrices as safetensors with metadata
(METHOD.md section 3, ARCHITECTURE.md "Adapters").

The file holds, per layer, the difference from the base model's key weight (fp16 by default:
a delta keeps untouched layers exactly at the base, and allows a strength `scale`), plus string
metadata: format version, base model id, the base keys' fingerprint, concepts, recipe, steps,
seed, any caller fields (job id...), and the sha256 of the tensors. Loading onto a model whose
base keys differ is an AdapterMismatchError. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sepen_core.errors import AdapterFormatError, AdapterMismatchError
from sepen_core.models import BaseModel, key_fingerprint, key_projection_names

FORMAT = "sepen.key-projection-adapter"
FORMAT_VERSION = 1


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
    (e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'), and their metadata."""

    deltas: dict[str, torch.Tensor]
    base_model_id: str
    base_fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)  # concepts, recipe, steps, seed, job_id...

    @classmethod
    def from_model(
        cls, model: BaseModel, metadata: dict[str, Any] | None = None, *, dtype: torch.dtype = torch.float16
    ) -> KeyProjectionAdapter:
        """Capture the difference between the model's current key weights and its base keys."""
        params = dict(model.unet.named_parameters())
        deltas = {
            name: (params[name].detach().float() - base.float()).to("cpu", dtype)
            for name, base in model.base_keys.items()
        }
        return cls(deltas, model.model_id, model.base_fingerprint, dict(metadata or {}))

    @property
    def sha256(self) -> str:
        return tensors_sha256(self.deltas)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.deltas.values())

    # -- bytes and files ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "representation": "delta",
            "base_model_id": self.base_model_id,
            "base_fingerprint": self.base_fingerprint,
            "tensors_sha256": self.sha256,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return save_safetensors({k: v.contiguous() for k, v in self.deltas.items()}, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyProjectionAdapter:
        try:
            tensors = load_safetensors(data)
            header = _safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"not a safetensors file: {exc}") from exc
        if header.get("format") != FORMAT:
            raise AdapterFormatError(f"not a sepen key-projection adapter (format {header.get('format')!r})")
        if header.get("format_version") != str(FORMAT_VERSION):
            raise AdapterFormatError(
                f"adapter format version {header.get('format_version')} is not supported (expected {FORMAT_VERSION})"
            )
        adapter = cls(
            tensors, header["base_model_id"], header["base_fingerprint"], json.loads(header.get("metadata", "{}"))
        )
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

    # -- applying ------------------------------------------------------------------------------
    def check_compatible(self, unet, fingerprint: str | None = None) -> None:
        """Raise AdapterMismatchError unless the adapter was trained on this UNet's base keys
        (`fingerprint` of the base keys if known, else computed from the UNet's current keys)."""
        names = key_projection_names(unet)
        if sorted(self.deltas) != names:
            raise AdapterMismatchError(
                f"adapter for {self.base_model_id!r} has {len(self.deltas)} key layers; "
                f"this model has {len(names)} with other names"
            )
        if fingerprint is None:
            params = dict(unet.named_parameters())
            fingerprint = key_fingerprint({n: params[n] for n in names})
        if fingerprint != self.base_fingerprint:
            raise AdapterMismatchError(
                f"adapter was trained on base model {self.base_model_id!r} "
                f"(key fingerprint {self.base_fingerprint[:12]}); this model's base keys differ"
            )

    def apply(self, target, scale: float = 1.0) -> None:
        """Add the deltas to a BaseModel, a UNet2DConditionModel or a diffusers StableDiffusionPipeline,
        in place. The target must hold its base keys (check_compatible verifies it)."""
        unet = target.unet if hasattr(target, "unet") else target
        base_keys = target.base_keys if isinstance(target, BaseModel) else None
        self.check_compatible(unet, target.base_fingerprint if base_keys is not None else None)
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for name, delta in self.deltas.items():
                base = base_keys[name] if base_keys is not None else params[name]
                params[name].copy_((base.float() + scale * delta.to(base.device).float()).to(params[name].dtype))

    @contextmanager
    def applied(self, model: BaseModel, scale: float = 1.0):
        """Apply to a BaseModel for the duration of a block, then restore its base keys."""
        self.apply(model, scale)
        try:
            yield model
        finally:
            restore_base_keys(model)


def restore_base_keys(model: BaseModel) -> None:
    params = dict(model.unet.named_parameters())
    with torch.no_grad():
        for name, base in model.base_keys.items():
            params[name].copy_(base)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (an 8-byte little-endian header length, then JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length exceeds the file")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {}) or {}
