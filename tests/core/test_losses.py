"""The SepEn losses against values worked out by hand, for two and for N objects."""

import math

import pytest
import torch

from sepen_core.losses import (
    enhance_loss,
    gaussian_kernel,
    peak_activation,
    prior_loss,
    separate_loss,
    sepen_loss,
    smooth_maps,
    soft_iou,
)


def two_maps(m1, m2):
    return torch.tensor([[m1, m2]], dtype=torch.float32)  # (B=1, K=2, H, W)


def test_separate_loss_is_soft_intersection_at_worst_pixel():
    m1 = [[0.6, 0.0], [0.2, 0.1]]
    m2 = [[0.2, 0.5], [0.2, 0.0]]
    # pixel values of m1*m2/(m1+m2): 0.12/0.8=0.15, 0, 0.04/0.4=0.1, 0 -> max 0.15
    assert separate_loss(two_maps(m1, m2), eps=0).item() == pytest.approx(0.15)


def test_separate_loss_is_zero_for_disjoint_maps_and_finite_where_both_are_zero():
    maps = two_maps([[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]])
    loss = separate_loss(maps)
    assert loss.item() == 0.0 and torch.isfinite(loss).all()


def test_gaussian_kernel_is_normalised_with_sigma_half_weights():
    k = gaussian_kernel(0.5)
    assert k.sum().item() == pytest.approx(1.0)
    g = torch.tensor([math.exp(-2), 1.0, math.exp(-2)])  # exp(-x^2 / (2 * 0.25)) at x = -1, 0, 1
    assert torch.allclose(k, torch.outer(g, g) / torch.outer(g, g).sum())


def test_smoothing_uses_reflect_padding():
    maps = torch.zeros(1, 1, 3, 3)
    maps[0, 0, 0, 0] = 1.0
    # reflect padding mirrors without repeating the edge: the corner's mirrored neighbours are (1,0),(0,1),(1,1)
    corner = smooth_maps(maps)[0, 0, 0, 0].item()
    assert corner == pytest.approx(gaussian_kernel(0.5)[1, 1].item())


def test_enhance_loss_lifts_the_weakest_smoothed_peak():
    strong = torch.full((4, 4), 0.8)
    weak = torch.full((4, 4), 0.1)
    maps = torch.stack([strong, weak])[None]  # constant maps: smoothing keeps them
    assert enhance_loss(maps).item() == pytest.approx(0.9)
    assert peak_activation(maps)[0].tolist() == pytest.approx([0.8, 0.1])


def test_n_objects_separate_is_mean_over_pairs_enhance_is_min_over_objects():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # fully overlaps a: pair value 0.5
    c = torch.tensor([[0.0, 0.0], [0.0, 0.3]])  # disjoint from both
    maps = torch.stack([a, b, c])[None]
    assert separate_loss(maps).item() == pytest.approx(0.5 / 3, abs=1e-5)
    weakest = peak_activation(maps)[0].min().item()
    assert enhance_loss(maps).item() == pytest.approx(1 - weakest)


def test_padded_objects_are_ignored():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    maps = torch.stack([torch.stack([a, b, a]), torch.stack([a, a, torch.zeros(2, 2)])])  # (2, 3, 2, 2)
    valid = torch.tensor([[True, True, False], [True, True, False]])
    sep = separate_loss(maps, valid)
    assert sep.tolist() == pytest.approx(
        [0.0, 0.5], abs=1e-5
    )  # the padded third map (a copy of a, or zeros) plays no part
    en = enhance_loss(maps, valid)
    assert torch.isfinite(en).all() and en[0].item() == pytest.approx(en[1].item())


def test_soft_iou():
    maps = two_maps([[0.5, 0.5], [0.0, 0.0]], [[0.5, 0.0], [0.5, 0.0]])
    assert soft_iou(maps).item() == pytest.approx(0.5 / 1.5)


def test_total_loss_weights_and_gradients():
    maps = torch.rand(3, 2, 8, 8, requires_grad=True)
    loss = sepen_loss(maps, lambda_sep=1.0, lambda_en=0.5)
    expected = separate_loss(maps).mean() + 0.5 * enhance_loss(maps).mean()
    assert loss.total.item() == pytest.approx(expected.item())
    loss.total.backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_prior_loss_is_mse():
    a, b = torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), 2.0)
    assert prior_loss(a, b).item() == pytest.approx(4.0)


def test_a_single_object_has_no_overlap():
    maps = torch.rand(2, 1, 4, 4)
    assert separate_loss(maps).tolist() == [0.0, 0.0] and soft_iou(maps).tolist() == [0.0, 0.0]
    assert enhance_loss(maps).shape == (2,)
