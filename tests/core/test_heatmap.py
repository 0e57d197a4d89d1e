"""The heatmap strip: the image, then one panel per object, under labels large enough to read (16 px where they fit,
never wider than their panel)."""

import numpy as np
import torch
from PIL import Image

from sepen_core.heatmap import LABEL_SIZE, MIN_LABEL_SIZE, MIN_PANEL, _label_font, render_heatmaps


def test_the_strip_has_a_panel_per_object_under_a_readable_label_row():
    image = Image.new("RGB", (32, 32), "red")  # the toy world's size: enlarged to MIN_PANEL
    strip = render_heatmaps(image, torch.rand(2, 8, 8), ["cherry", "umbrella"], [0.54, 0.31])
    label_h = strip.height - MIN_PANEL
    assert strip.width == 3 * MIN_PANEL and label_h >= LABEL_SIZE
    pixels = np.asarray(strip)
    assert (pixels[label_h:, :MIN_PANEL] == [255, 0, 0]).all()  # the image itself, below the labels
    for k in range(3):  # each label row has ink (a label) inside its own panel
        assert (pixels[:label_h, k * MIN_PANEL : (k + 1) * MIN_PANEL] < 128).any()


def test_a_long_label_shrinks_to_its_panel_but_not_below_the_minimum():
    assert _label_font("cherry 0.54", 122).size == LABEL_SIZE
    font = _label_font("a-very-long-concept-name 0.54", 122)
    assert MIN_LABEL_SIZE <= font.size < LABEL_SIZE
    assert font.getlength("a-very-long-concept-name 0.54") <= 122 or font.size == MIN_LABEL_SIZE
