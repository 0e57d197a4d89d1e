"""The early-exit exact path gives the to_k gradients of the naive whole-UNet reference; `local` approximates them."""

import pytest
import torch
import torch.nn.functional as F

from sepen_core.config import FinetuneConfig, MapConfig
from sepen_core.objective import make_training_batch, sepen_objective
from sepen_core.prompts import ConceptSet
from sepen_core.reference import reference_objective

MAP_LAYER_KEYS = ("down_blocks.2.", "up_blocks.1.")


def key_gradients(model, objective, batch, config):
    params = {n: p for n, p in model.unet.named_parameters() if n in model.base_keys}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        out = objective(model, batch, config)
        out.loss.total.backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}, out
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


def flat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


@pytest.mark.parametrize("normalization", ["raw", "content"])
def test_exact_gradients_equal_the_reference(tiny_model, normalization):
    config = FinetuneConfig(batch_size=3, maps=MapConfig(normalization=normalization))
    concepts = ConceptSet.pairs(("cat", "dog"), ("horse", "hippopotamus", "bird"))
    batch = make_training_batch(tiny_model, concepts, config, step=0)
    ref, ref_out = key_gradients(tiny_model, reference_objective, batch, config)
    ours, our_out = key_gradients(tiny_model, sepen_objective, batch, config)
    assert our_out.loss.total.item() == pytest.approx(ref_out.loss.total.item(), rel=1e-6)
    # Same set of layers receives gradient: those up to the last map layer (not up_blocks.2/3).
    assert {n for n, g in ref.items() if g is not None} == {n for n, g in ours.items() if g is not None}
    reached = [n for n, g in ref.items() if g is not None]
    assert len(reached) == 10 and not any(n.startswith(("up_blocks.2.", "up_blocks.3.")) for n in reached)
    for name in reached:
        assert F.cosine_similarity(ref[name].flatten(), ours[name].flatten(), dim=0) >= 0.9999, name
    assert F.cosine_similarity(flat(ref, reached), flat(ours, reached), dim=0) >= 0.9999
    assert torch.allclose(flat(ref, reached), flat(ours, reached), rtol=1e-3, atol=1e-9)


def test_local_gradients_reach_only_map_layers_and_approximate_them(tiny_model):
    concepts = ConceptSet.pairs(("cat", "dog"))
    exact_cfg = FinetuneConfig(batch_size=2)
    batch = make_training_batch(tiny_model, concepts, exact_cfg, step=1)
    exact, _ = key_gradients(tiny_model, sepen_objective, batch, exact_cfg)
    local, _ = key_gradients(tiny_model, sepen_objective, batch, FinetuneConfig(batch_size=2, grad_mode="local"))
    got = sorted(n for n, g in local.items() if g is not None)
    assert len(got) == 5 and all(n.startswith(MAP_LAYER_KEYS) for n in got)
    # On a map layer, the direct path (its own maps) dominates: local stays close to exact.
    assert F.cosine_similarity(flat(exact, got), flat(local, got), dim=0) > 0.9
