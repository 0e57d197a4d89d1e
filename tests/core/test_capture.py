"""Map capture: explicit probabilities only where needed, a forward that ends at the last map layer (traceable whole
by torch.compile), processors restored, per-sample maps."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sepen_core.attention import (
    CrossAttentionProcessor,
    MapRecorder,
    MapTargets,
    attn2_downsample_factors,
    base_key_forward,
    capture_maps,
    forward_position,
    forward_until,
    installed_processors,
    last_layer,
    map_layers,
    unet_forward,
)
from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SD1_MAP_LAYERS = [
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
]


def inputs(model, prompts, concepts, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), 4, 32, 32, generator=g)
    timesteps = torch.tensor([500] * len(prompts))
    cond = model.encode_prompts(prompts)
    positions = [locate_concepts(model.tokenizer, p, c) for p, c in zip(prompts, concepts, strict=True)]
    mask, valid = concept_token_mask(positions, cond.input_ids.shape[1])
    return latents, timesteps, cond, mask, valid, content_token_mask(cond.input_ids, model.tokenizer.eos_token_id)


def targets(concept_mask, content_mask, layers=SD1_MAP_LAYERS, grid=(8, 8)):
    """Map targets with the given masks (every object real), read at downsample 4 of the 32x32 latents."""
    valid = torch.ones(concept_mask.shape[:2], dtype=torch.bool)
    return MapTargets(concept_mask, valid, content_mask, tuple(layers), grid)


def test_sd1_layout_has_16_key_layers_and_5_map_layers(tiny_model):
    factors = attn2_downsample_factors(tiny_model.unet)
    assert len(factors) == 16 and len(tiny_model.base_keys) == 16
    assert map_layers(tiny_model.unet, 4) == SD1_MAP_LAYERS
    with pytest.raises(ConfigError, match="map_downsample"):
        map_layers(tiny_model.unet, 16)


def test_capture_stops_after_last_map_layer_and_restores_processors(tiny_model):
    unet = tiny_model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    called = []
    hooks = [
        unet.up_blocks[2].register_forward_pre_hook(lambda *a: called.append("up2")),
        unet.up_blocks[1].upsamplers[0].register_forward_pre_hook(lambda *a: called.append("up1 upsampler")),
        unet.up_blocks[1].attentions[-1].register_forward_pre_hook(lambda *a: called.append("up1 last attention")),
    ]
    try:
        latents, t, cond, mask, *_ = inputs(tiny_model, ["a photo of a cat and a dog"], [["cat", "dog"]])
        recorder = capture_maps(unet, latents, t, cond, targets(mask, torch.ones(1, 77)))
    finally:
        for h in hooks:
            h.remove()
    assert recorder.count == 5
    assert called == ["up1 last attention"]  # the forward ends with it: no upsampler, no up_blocks.2
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert all(t is AttnProcessor2_0 for t in before.values())


def test_raw_maps_are_probabilities_and_content_maps_renormalise(tiny_model):
    latents, t, cond, _, _, content = inputs(tiny_model, ["a photo of a cat and a dog"], [["cat", "dog"]])
    every_token = torch.ones(1, 1, 77)
    recorder = capture_maps(tiny_model.unet, latents, t, cond, targets(every_token, content))
    assert torch.allclose(recorder.maps("raw"), torch.ones(1, 1, 8, 8), atol=1e-5)  # softmax over all 77 tokens
    content_only = content[:, None, :]
    recorder = capture_maps(tiny_model.unet, latents, t, cond, targets(content_only, content))
    assert torch.allclose(recorder.maps("content"), torch.ones(1, 1, 8, 8), atol=1e-5)
    assert (recorder.maps("raw") < 1).all()


def test_maps_equal_explicit_attention_averaged_over_heads_and_layers(tiny_model):
    """Recompute the object maps from diffusers' own explicit AttnProcessor, via forward hooks."""
    unet = tiny_model.unet
    latents, t, cond, mask, _, content = inputs(tiny_model, ["a photo of a cat and a dog"] * 2, [["cat", "dog"]] * 2)
    captured = []

    class Keeping(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            captured.append(attn.get_attention_scores(q, k).view(2, attn.heads, -1, 77).mean(1))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    with installed_processors(unet, {name: Keeping() for name in SD1_MAP_LAYERS}), torch.no_grad():
        unet_forward(unet, latents, t, cond)
    probs = torch.stack(captured).mean(0)  # (B, 64, 77)
    expected = probs[:, :, [5, 8]].permute(0, 2, 1).reshape(2, 2, 8, 8)
    recorder = capture_maps(unet, latents, t, cond, targets(mask, content))
    assert torch.allclose(recorder.maps("raw"), expected, atol=1e-6)


def test_maps_are_per_sample(tiny_model):
    prompts = ["a photo of a cat and a dog", "a horse with a hippopotamus"]
    latents, t, cond, mask, valid, content = inputs(tiny_model, prompts, [["cat", "dog"], ["horse", "hippopotamus"]])
    both = capture_maps(tiny_model.unet, latents, t, cond, targets(mask, content)).maps()
    for b in range(2):
        alone = capture_maps(
            tiny_model.unet,
            latents[b : b + 1],
            t[b : b + 1],
            cond.select([b]),
            targets(mask[b : b + 1], content[b : b + 1]),
        ).maps()
        assert torch.allclose(both[b : b + 1], alone, atol=1e-6)


def test_recorder_rows_select_the_conditional_half():
    recorder = MapRecorder(targets(torch.ones(1, 1, 3), torch.ones(1, 3), layers=(), grid=(1, 2)), rows=slice(1, 2))
    # (B=2 rows * 1 head, 2 px, 3 tokens)
    probs = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0]], [[0, 0.5, 0.5], [0, 0, 1.0]]])
    mask = torch.tensor([[[0.0, 1.0, 0.0]]])
    recorder.concept_mask = mask
    recorder.add(probs, heads=1)
    assert recorder.maps().tolist() == [[[[0.5, 0.0]]]]


def test_base_key_forward_equals_unet_with_base_weights(fresh_tiny_model):
    model = fresh_tiny_model
    latents, t, cond, *_ = inputs(model, ["a photo of a cat"], [["cat"]])
    with torch.no_grad():
        expected = unet_forward(model.unet, latents, t, cond)
        for name, p in model.unet.named_parameters():
            if name in model.base_keys:
                p.add_(torch.randn_like(p) * 0.5)
        changed = unet_forward(model.unet, latents, t, cond)
    assert not torch.allclose(changed, expected, atol=1e-4)
    assert torch.allclose(base_key_forward(model.unet, model.base_keys, latents, t, cond), expected, atol=1e-5)


def test_attention_mask_is_honoured_by_capture(tiny_model):
    latents, t, cond, mask, _, content = inputs(tiny_model, ["a photo of a cat and a dog"], [["cat", "dog"]])
    cond.encoder_attention_mask = (torch.arange(77) < 10).float()[None]  # mask out padding keys
    every_token = torch.ones(1, 1, 77)
    maps = capture_maps(tiny_model.unet, latents, t, cond, targets(every_token, content)).maps()
    assert torch.allclose(maps, torch.ones_like(maps), atol=1e-5)
    padding = torch.zeros(1, 1, 77)
    padding[..., 10:] = 1
    maps = capture_maps(tiny_model.unet, latents, t, cond, targets(padding, content)).maps()
    assert maps.max() < 1e-3


@pytest.mark.parametrize("last", ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.2.attentions.1"])
def test_forward_until_records_what_the_whole_forward_records(tiny_model, last):
    """Stopping in a down block, in the mid block or in an up block: the maps up to there are the whole forward's."""
    unet = tiny_model.unet
    factors = attn2_downsample_factors(unet)
    stop = f"{last}.transformer_blocks.0.attn2"
    layers = [n for n, f in factors.items() if f == factors[stop] and forward_position(n) <= forward_position(stop)]
    latents, t, cond, mask, *_ = inputs(tiny_model, ["a photo of a cat and a dog"], [["cat", "dog"]])
    early = MapRecorder(targets(mask, torch.ones(1, 77), layers=layers, grid=(1, 1)), keep_tokens=True)
    whole = MapRecorder(targets(mask, torch.ones(1, 77), layers=layers, grid=(1, 1)), keep_tokens=True)
    assert last_layer(layers).startswith(last)
    with torch.no_grad():
        for recorder, run in ((early, "until"), (whole, "whole")):
            processors = {name: CrossAttentionProcessor(recorder) for name in layers}
            with installed_processors(unet, processors):
                if run == "until":
                    forward_until(unet, latents, t, cond, last_layer(layers))
                else:
                    unet_forward(unet, latents, t, cond)
    assert early.count == whole.count == len(layers)
    assert torch.equal(early.token_probs(), whole.token_probs())


TRACE = """
import torch
from sepen_core.attention import MapTargets, capture_maps, map_layers
from sepen_core.models import build_tiny_model

model = build_tiny_model(seed=0)
cond = model.encode_prompts(["a photo of a cat and a dog"])
mask = torch.zeros(1, 2, 77)
mask[0, 0, 4] = mask[0, 1, 7] = 1
layers = tuple(map_layers(model.unet, 4))
chosen = MapTargets(mask, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 77), layers, (8, 8))
latents, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
with torch.no_grad():
    explained = torch._dynamo.explain(lambda x: capture_maps(model.unet, x, t, cond, chosen).maps())(latents)
print(explained.graph_count, explained.graph_break_count)
"""


def test_capture_traces_as_one_graph():
    """No exception ends the forward and nothing breaks the trace: torch.compile can take the capture whole (in a
    fresh interpreter: pytest's import hooks would themselves break a trace)."""
    run = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["1", "0"]  # one graph, no break
