"""A labelled sheet of generated images for a person to check the detector against (its audit on generated images).

    python -m toyworld.audit --model runs/world-v2/model --out audit.png --images 64

Each cell is one sampled validation-pair image, enlarged, with the prompt's nouns above it and what
the detector found below it (missing nouns with their failure kind). A person marks the cells where
the label is wrong; docs/toyworld-benchmark.md records the count. Seeds differ from the evaluation's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sepen_core.config import SampleConfig
from sepen_core.models import load_base_model
from sepen_core.sampling import generate
from toyworld.detector import detections, find_candidates
from toyworld.evaluate import group_prompts
from toyworld.failures import failure_kinds
from toyworld.world import World, caption, load_world

SEED = 7_000_000
CELL, LABEL = 128, 30


def audit_sheet(model, world: World, images: int, columns: int = 8, group: str = "validation") -> Image.Image:
    """`images` samples spread over the group's prompts, one image per prompt in turn."""
    prompts = group_prompts(world, group)
    rows = -(-images // columns)
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + 2 * LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k in range(images):
        nouns = prompts[k % len(prompts)]
        result = generate(
            model, caption(nouns), SampleConfig(num_inference_steps=20, guidance_scale=1.0, seed=SEED + k)
        )
        pixels = result.pixels[0]
        candidates = find_candidates(world, pixels)
        found = detections(candidates)
        kinds = failure_kinds(candidates, nouns)
        x, y = (k % columns) * CELL, (k // columns) * (CELL + 2 * LABEL)
        sheet.paste(result.images[0].resize((CELL, CELL), Image.NEAREST), (x, y + LABEL))
        draw.text((x + 2, y + 2), f"{k}: {' + '.join(nouns)}", fill=(0, 0, 0))
        below = "found " + (", ".join(found) or "nothing")
        if kinds:
            below += "\n" + ", ".join(f"{n}: {kind}" for n, kind in kinds.items())
        draw.text((x + 2, y + LABEL + CELL + 1), below, fill=(160, 0, 0) if kinds else (0, 100, 0))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A labelled sheet of generated images to audit the detector.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--group", default="validation", help="evaluation group (toyworld.evaluate.GROUPS)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    world = load_world(model_dir / "world.json") if (model_dir / "world.json").exists() else load_world()
    model = load_base_model(model_dir).to(args.device)
    audit_sheet(model, world, args.images, group=args.group).save(args.out)


if __name__ == "__main__":
    main()
