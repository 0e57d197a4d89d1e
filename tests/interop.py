"""Helpers of the tests of sepen's interoperability: adapters with known spectra, and A1111's infotext parser."""

import json
import re

import torch

from sepen_core.adapters import KeyProjectionAdapter


def spectral_adapter(model, *, seed: int = 0, dtype=torch.float16, top: float = 0.2) -> KeyProjectionAdapter:
    """Deltas with known spectra: layer i's singular values start at `top` and fall by a factor 0.3 + 0.04 i per
    index, so an energy threshold keeps a different rank in different layers."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, (name, weight) in enumerate(sorted(model.base_keys.items())):
        out_dim, in_dim = weight.shape
        k = min(out_dim, in_dim)
        u, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=generator, dtype=torch.float64))
        singular = top * (0.3 + 0.04 * i) ** torch.arange(k, dtype=torch.float64)
        deltas[name] = (u * singular) @ v.T
    metadata = {"name": "cat-dog", "concepts": {"groups": [["cat", "dog"]]}, "recipe": {"steps": 3}, "steps": 3}
    return KeyProjectionAdapter(
        {n: d.to(dtype) for n, d in deltas.items()}, model.model_id, model.base_fingerprint, metadata
    )


def pipeline_images(pipe, prompt: str, seeds: list[int], steps: int = 4):
    """Images of diffusers' own pipeline, one per seed (each from its own generator), as sepen's generate() seeds
    them, at sepen's default guidance 6.0, as numpy arrays in [0, 1]."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=6.0,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images


# A1111's infotext grammar (modules/infotext_utils.py, parse_generation_parameters): the last line holds at least
# three `Key: value` fields, a value JSON-quoted when it contains a comma, colon or newline; the lines before are
# the prompt, then from a line starting "Negative prompt:" the negative prompt; "Size: WxH" becomes Size-1, Size-2.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111(text: str) -> dict[str, str]:
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, negative_started = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative_started, line = True, line[len("Negative prompt:") :].strip()
        (negative if negative_started else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = A1111_SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
        else:
            fields[key] = value
    return fields


def publish_adapter(
    session, adapter: KeyProjectionAdapter, name: str, *, tenant: str = "acme", model: str = "sepen-tiny"
):
    """Store an adapter as version name@N of a tenant, as a finetune job would (with a finetune job row of its own)."""
    from sepen_store.jobs import create_job
    from sepen_store.registry import publish_version

    finetune, _ = create_job(session, tenant, "finetune", {"seeded": name})
    return publish_version(
        session,
        tenant=tenant,
        name=name,
        job_id=finetune.id,
        data=adapter.to_bytes(),
        base_model=model,
        base_fingerprint=adapter.base_fingerprint,
        sha256=adapter.sha256,
        metadata=adapter.metadata,
    )
