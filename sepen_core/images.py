"""PNG files of generated images with the text metadata that says how each was made (prompt, seed, model...).

Beside sepen's own chunks (`prompt`, `seed`, `model`, `adapter`, `steps`, `guidance_scale`, `guidance_method` and,
for Attend-and-Excite, `excite_scale`) each image carries a `parameters` chunk in the AUTOMATIC1111 web UI's form,
which its PNG Info tab reads (docs/interop.md):

    a photo of a cat and a dog
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 6.0, Seed: 7, Size: 512x512, Model: sd15, SepEn adapter: cat-dog@1

Torch-free; the CLI writes these files and the worker stores the same bytes.
"""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sepen_core.config import SampleConfig

# diffusers scheduler class -> the sampler's name in A1111's infotext; others go by their class name less "Scheduler".
A1111_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}


def sampler_name(scheduler: object | str) -> str:
    """A1111's name of the sampler a diffusers scheduler (or its class name) runs: DDIMScheduler -> 'DDIM'."""
    name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    return A1111_SAMPLERS.get(name, name.removesuffix("Scheduler"))


def _infotext_value(value: object) -> str:
    """A value as A1111 writes it in the parameters line: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(
    prompt: str,
    seed: int,
    config: SampleConfig,
    *,
    model: str,
    size: tuple[int, int],
    sampler: str,
    adapter: str | None,
) -> str:
    """The A1111 'parameters' text: the prompt, 'Negative prompt: ...' when there is one, then one line of
    'Key: value' fields (Steps, Sampler, CFG scale, Seed, Size as WxH, Model, SepEn adapter, and for
    Attend-and-Excite its scale)."""
    excited = config.guidance_method == "attend-excite"
    fields = {
        "Steps": config.num_inference_steps,
        "Sampler": sampler,
        "CFG scale": config.guidance_scale,
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model,
        "SepEn adapter": adapter or None,
        "Attend-and-Excite scale": config.excite_scale if excited else None,
    }
    line = ", ".join(f"{key}: {_infotext_value(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {config.negative_prompt}" if config.negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def sample_metadata(
    prompt: str,
    seed: int,
    config: SampleConfig,
    *,
    model: str,
    adapter: str | None,
    size: tuple[int, int],
    sampler: str,
    adapter_name: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """What it takes to make an image again: prompt, seed, model, adapter ("" for none), any extra entries (the
    service's job id), the sampling steps, guidance scale and guidance method (with Attend-and-Excite's scale), then
    A1111's `parameters` (image `size` as (width,
    height), `sampler` as sampler_name gives it, the adapter by `adapter_name` if given, else as `adapter`)."""
    return {
        "prompt": prompt,
        "seed": str(seed),
        "model": model,
        "adapter": adapter or "",
        **extra,
        "steps": str(config.num_inference_steps),
        "guidance_scale": str(config.guidance_scale),
        "guidance_method": config.guidance_method,
        **({"excite_scale": str(config.excite_scale)} if config.guidance_method == "attend-excite" else {}),
        "parameters": a1111_parameters(
            prompt, seed, config, model=model, size=size, sampler=sampler, adapter=adapter_name or adapter
        ),
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
