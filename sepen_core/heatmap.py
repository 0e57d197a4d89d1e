"""Render per-object attention maps as a heatmap image: the generated image, then one overlay per object."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

MIN_PANEL = 128  # smaller images (the 32 px toy world) are enlarged so that labels and maps stay legible
# Labels above the panels: 16 px where they fit (8 px was unreadable on a phone), smaller for a long name in a narrow
# panel; Pillow's own font (FreeType's build of it: no font file needed).
LABEL_SIZE, MIN_LABEL_SIZE, LABEL_PAD = 16, 10, 3
# A perceptually ordered dark-to-bright ramp (black, purple, red, orange, pale yellow).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours along the ramp."""
    x = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def render_heatmaps(
    image: Image.Image, maps: torch.Tensor, labels: list[str], peaks: list[float] | None = None
) -> Image.Image:
    """maps (K, h, w) for one image -> one row: the image, then each object's map upsampled and
    blended over it. All panels share one colour scale (the largest value among the maps), so a
    weak object looks weak."""
    if image.width < MIN_PANEL:
        factor = -(-MIN_PANEL // image.width)  # ceil
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    width, height = image.size
    up = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]  # (K, H, W)
    scale = float(up.max().clamp_min(1e-12))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    texts = ["image"] + [label if peaks is None else f"{label} {peaks[k]:.2f}" for k, label in enumerate(labels)]
    fonts = [_label_font(text, width - 2 * LABEL_PAD) for text in texts]
    label_h = max(getattr(font, "size", 11) for font in fonts) + 2 * LABEL_PAD  # 11: the bitmap font without FreeType
    canvas = Image.new("RGB", (width * (len(labels) + 1), height + label_h), "white")
    canvas.paste(image.convert("RGB"), (0, label_h))
    for k in range(len(labels)):
        heat = colorize((up[k] / scale).numpy())
        blended = (0.35 * base + 0.65 * heat).astype(np.uint8)
        canvas.paste(Image.fromarray(blended), ((k + 1) * width, label_h))
    draw = ImageDraw.Draw(canvas)
    for k, (text, font) in enumerate(zip(texts, fonts, strict=True)):
        draw.text((k * width + LABEL_PAD, LABEL_PAD), text, fill="black", font=font)
    return canvas


def _label_font(text: str, room: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest font of at most LABEL_SIZE px (at least MIN_LABEL_SIZE) that fits `text` in `room` pixels."""
    size = LABEL_SIZE
    font = ImageFont.load_default(size=size)
    while size > MIN_LABEL_SIZE and font.getlength(text) > room:
        size -= 1
        font = ImageFont.load_default(size=size)
    return font
