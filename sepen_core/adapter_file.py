"""The sepen adapter file read without torch: header fields, tensors as numpy arrays, the tensors' sha256 checked.

A sepen adapter file is safetensors (ARCHITECTURE.md "Adapters"): string metadata (`format`, `format_version`,
`representation`, `base_model_id`, `base_fingerprint`, `tensors_sha256`, `metadata` as JSON, `base_architecture`
where it is not "sd") and, per key layer, either
    representation "delta" (format version 1)     `<layer>` (out, in): the layer's delta itself
    representation "low_rank" (format version 2)  `<layer>.up` (out, r) and `<layer>.down` (r, in): delta = up @ down
where <layer> is the state-dict name, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight. A dense
adapter is written as version 1, byte for byte what sepen wrote before low-rank storage; a low-rank one as version 2,
which older sepen refuses by its version check. sepen_core.adapters writes and applies the file with torch; this
module reads it with numpy alone, so the gateway can convert a stored version (sepen_core.export) without torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepen_core.errors import AdapterFormatError
from sepen_core.model_card import ARCHITECTURES  # a file without base_architecture is "sd"'s

FORMAT = "sepen.key-projection-adapter"
FORMAT_VERSION = 1  # a dense adapter's (representation "delta"): what sepen wrote before low-rank storage
LOW_RANK_FORMAT_VERSION = 2  # a low-rank adapter's (representation "low_rank")
FORMAT_VERSIONS = (FORMAT_VERSION, LOW_RANK_FORMAT_VERSION)
REPRESENTATIONS = ("delta", "low_rank")
FACTORS = ("up", "down")  # a low-rank layer's tensors: <layer>.up (out, r), <layer>.down (r, in)
# safetensors dtype -> (numpy dtype of the stored bytes, torch's name for it: tensors_sha256 hashes that name)
_DTYPES = {"F16": (np.float16, "float16"), "F32": (np.float32, "float32"), "BF16": (np.uint16, "bfloat16")}


@dataclass
class AdapterFile:
    """A parsed sepen adapter file: float32 deltas by state-dict name (or, for a low-rank file, float32 factors and
    no deltas), the dtype they were stored in, and the header."""

    deltas: dict[str, np.ndarray]
    stored_dtype: str  # "float16", "float32" or "bfloat16"
    base_model_id: str
    base_fingerprint: str
    tensors_sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # up (out, r), down (r, in)
    base_architecture: str = "sd"

    @property
    def representation(self) -> str:
        return "low_rank" if self.factors else "delta"

    @property
    def layer_names(self) -> list[str]:
        return sorted(self.factors or self.deltas)

    def delta(self, name: str) -> np.ndarray:
        """Layer `name`'s delta (out, in), float32: the stored one, or the product of its factors."""
        if name in self.factors:
            up, down = self.factors[name]
            return up @ down
        return self.deltas[name]


def check_header(meta: dict[str, str]) -> str:
    """The representation ("delta" or "low_rank") of a sepen adapter file with this safetensors metadata;
    AdapterFormatError if it is not a sepen adapter, or of a version or kind this sepen does not read."""
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"not a sepen key-projection adapter (format {meta.get('format')!r})")
    versions = [str(v) for v in FORMAT_VERSIONS]
    if meta.get("format_version") not in versions:
        raise AdapterFormatError(
            f"adapter format version {meta.get('format_version')} is not supported (expected {' or '.join(versions)})"
        )
    representation = meta.get("representation", "delta")
    if representation not in REPRESENTATIONS:
        raise AdapterFormatError(f"adapter representation {representation!r} is not one of {REPRESENTATIONS}")
    if representation == "low_rank" and meta["format_version"] != str(LOW_RANK_FORMAT_VERSION):
        raise AdapterFormatError(f"a low-rank adapter is format version {LOW_RANK_FORMAT_VERSION}, not 1")
    architecture = meta.get("base_architecture", "sd")
    if architecture not in ARCHITECTURES:
        raise AdapterFormatError(f"base_architecture {architecture!r} is not one of {ARCHITECTURES}")
    return representation


def factor_layers(shapes: dict[str, Sequence[int]]) -> list[str]:
    """The layers of a low-rank adapter whose tensors have these names and shapes, sorted: each layer's
    `<layer>.up` (out, r) and `<layer>.down` (r, in). AdapterFormatError naming the layer whose factors are missing
    or do not fit together."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        layer, _, kind = name.rpartition(".")
        if kind not in FACTORS or not layer:
            raise AdapterFormatError(f"tensor {name!r} of a low-rank adapter is no layer's .up or .down factor")
        layers.setdefault(layer, {})[kind] = tuple(shape)
    for layer, parts in sorted(layers.items()):
        missing = [kind for kind in FACTORS if kind not in parts]
        if missing:
            raise AdapterFormatError(f"layer {layer}: its .{missing[0]} factor is missing")
        up, down = parts["up"], parts["down"]
        if len(up) != 2 or len(down) != 2 or up[1] != down[0] or up[1] < 1:
            raise AdapterFormatError(
                f"layer {layer}: factors up {list(up)} and down {list(down)} do not fit (expected (out, r) and (r, in))"
            )
    return sorted(layers)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (an 8-byte little-endian header length, then JSON)."""
    return _header(data).get("__metadata__", {}) or {}


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(data[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _as_float32(raw: bytes, code: str, shape: list[int]) -> np.ndarray:
    stored, _ = _DTYPES[code]
    array = np.frombuffer(raw, dtype=np.dtype(stored).newbyteorder("<")).reshape(shape)
    if code == "BF16":  # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def read_adapter_file(data: bytes) -> AdapterFile:
    """Parse and verify a sepen adapter file; AdapterFormatError if it is not one, or is corrupt."""
    try:
        header = _header(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"not a safetensors file: {exc}") from exc
    meta = header.pop("__metadata__", None) or {}
    representation = check_header(meta)
    body = data[8 + int.from_bytes(data[:8], "little") :]
    digest = hashlib.sha256()
    tensors, dtypes = {}, set()
    for name in sorted(header):
        info = header[name]
        code, shape, (start, end) = info.get("dtype"), info.get("shape"), info.get("data_offsets", (0, -1))
        if code not in _DTYPES or not 0 <= start <= end <= len(body):
            raise AdapterFormatError(f"tensor {name!r}: unsupported dtype {code!r} or offsets past the end of the file")
        raw = body[start:end]
        torch_name = _DTYPES[code][1]
        digest.update(f"{name}:torch.{torch_name}:{tuple(shape)}".encode())  # as adapters.tensors_sha256 does
        digest.update(raw)
        try:
            tensors[name] = _as_float32(raw, code, shape)
        except ValueError as exc:
            raise AdapterFormatError(f"tensor {name!r} does not match its shape {shape}: {exc}") from exc
        dtypes.add(torch_name)
    if digest.hexdigest() != meta.get("tensors_sha256"):
        raise AdapterFormatError("adapter tensors do not match their recorded sha256: the file is corrupt")
    if not tensors or len(dtypes) != 1:
        raise AdapterFormatError("an adapter holds at least one key delta, all of one dtype")
    deltas, factors = tensors, {}
    if representation == "low_rank":
        layers = factor_layers({name: t.shape for name, t in tensors.items()})
        deltas, factors = {}, {layer: (tensors[f"{layer}.up"], tensors[f"{layer}.down"]) for layer in layers}
    try:
        metadata = json.loads(meta.get("metadata", "{}"))
        return AdapterFile(
            deltas,
            dtypes.pop(),
            meta["base_model_id"],
            meta["base_fingerprint"],
            meta["tensors_sha256"],
            metadata,
            factors,
            meta.get("base_architecture", "sd"),
        )
    except (KeyError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"the adapter's header lacks or garbles {exc}") from exc
