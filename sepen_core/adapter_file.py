"""The sepen adapter file read without torch: header fields, tensors as numpy arrays, the tensors' sha256 checked.

A sepen adapter file is safetensors (ARCHITECTURE.md "Adapters"): one `...attn2.to_k.weight` delta per key layer and
string metadata (`format`, `format_version`, `base_model_id`, `base_fingerprint`, `tensors_sha256`, `metadata` as
JSON). sepen_core.adapters writes and applies it with torch; this module reads it with numpy alone, so the gateway
can convert a stored version (sepen_core.export) without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepen_core.errors import AdapterFormatError

FORMAT = "sepen.key-projection-adapter"
FORMAT_VERSION = 1
# safetensors dtype -> (numpy dtype of the stored bytes, torch's name for it: tensors_sha256 hashes that name)
_DTYPES = {"F16": (np.float16, "float16"), "F32": (np.float32, "float32"), "BF16": (np.uint16, "bfloat16")}


@dataclass
class AdapterFile:
    """A parsed sepen adapter file: float32 deltas by state-dict name, the dtype they were stored in, and the header."""

    deltas: dict[str, np.ndarray]
    stored_dtype: str  # "float16", "float32" or "bfloat16"
    base_model_id: str
    base_fingerprint: str
    tensors_sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)


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
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"not a sepen key-projection adapter (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise AdapterFormatError(
            f"adapter format version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    body = data[8 + int.from_bytes(data[:8], "little") :]
    digest = hashlib.sha256()
    deltas, dtypes = {}, set()
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
            deltas[name] = _as_float32(raw, code, shape)
        except ValueError as exc:
            raise AdapterFormatError(f"tensor {name!r} does not match its shape {shape}: {exc}") from exc
        dtypes.add(torch_name)
    if digest.hexdigest() != meta.get("tensors_sha256"):
        raise AdapterFormatError("adapter tensors do not match their recorded sha256: the file is corrupt")
    if not deltas or len(dtypes) != 1:
        raise AdapterFormatError("an adapter holds at least one key delta, all of one dtype")
    try:
        metadata = json.loads(meta.get("metadata", "{}"))
        return AdapterFile(
            deltas, dtypes.pop(), meta["base_model_id"], meta["base_fingerprint"], meta["tensors_sha256"], metadata
        )
    except (KeyError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"the adapter's header lacks or garbles {exc}") from exc
