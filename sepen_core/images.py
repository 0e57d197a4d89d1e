"""PNG files of generated images with the text metadata that says how each was made (prompt, seed, model...).

Torch-free; the CLI writes these files and the worker stores the same bytes.
"""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sepen_core.config import SampleConfig


def sample_metadata(
    prompt: str, seed: int, config: SampleConfig, *, model: str, adapter: str | None, **extra: str
) -> dict[str, str]:
    """What it takes to make an image again: prompt, seed, model, adapter ("" for none), any extra
    entries (the service's job id), then the sampling steps and guidance scale."""
    return {
        "prompt": prompt,
        "seed": str(seed),
        "model": model,
        "adapter": adapter or "",
        **extra,
        "steps": str(config.num_inference_steps),
        "guidance_scale": str(config.guidance_scale),
    }


def png_info(metadata: dict[str, str]) -> PngInfo:
    """One PNG text chunk per entry, in order."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    return info


def png_bytes(image: Image.Image, metadata: dict[str, str]) -> bytes:
    """The PNG file of `image` with `metadata` as its text chunks (read back with Image.open(...).text)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()
