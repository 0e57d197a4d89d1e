"""Cross-attention map capture through diffusers attention processors (METHOD.md section 2).

Only the `attn2` layers whose maps are needed compute explicit `attention_probs` (keeping their
autograd graph); every other layer keeps its fast SDPA processor; processors are restored on
exit. MapTargets say where each object's maps are read (its sub-tokens, the layers, the grid); a
MapRecorder turns each captured layer's probabilities into per-sample object maps at once, so no
(batch * heads, H * W, tokens) tensor outlives its layer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.errors import ConfigError
from sepen_core.models import BaseModel, TextConditioning

CONTENT_EPS = 1e-12


def attn2_downsample_factors(unet: UNet2DConditionModel) -> dict[str, int]:
    """Every cross-attention module path (`...attn2`) with its query grid's downsampling vs the latent."""
    block_factor: dict[str, int] = {}
    factor = 1
    for i, block in enumerate(unet.down_blocks):
        block_factor[f"down_blocks.{i}"] = factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    block_factor["mid_block"] = factor
    for i, block in enumerate(unet.up_blocks):
        block_factor[f"up_blocks.{i}"] = factor
        if getattr(block, "upsamplers", None):
            factor //= 2
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith(".attn2"):
            prefix = name.split(".attentions.")[0]
            layers[name] = block_factor[prefix]
    return layers


def map_layers(unet: UNet2DConditionModel, map_downsample: int) -> list[str]:
    """The attn2 module paths read for maps (5 in SD 1.x at downsample 4)."""
    layers = [name for name, f in attn2_downsample_factors(unet).items() if f == map_downsample]
    if not layers:
        available = sorted(set(attn2_downsample_factors(unet).values()))
        raise ConfigError(
            "map_downsample",
            f"no cross-attention layer of this model works at 1/{map_downsample} "
            f"of the latent size; choose one of {available}",
        )
    return layers


@dataclass(frozen=True)
class MapTargets:
    """Where the object maps of a batch of prompts are read: built once by `map_targets`, shared by
    capture, the SepEn objective, diagnostics, sampling and Attend-and-Excite."""

    concept_mask: torch.Tensor  # (B, K, T) 1 on each object's sub-tokens
    valid: torch.Tensor  # (B, K) bool, the real objects (K is the largest object count of the batch)
    content_mask: torch.Tensor  # (B, T) each prompt's content tokens
    layers: tuple[str, ...]  # the attn2 module paths whose maps are averaged
    grid: tuple[int, int]  # (h, w) of the maps

    def select(self, rows: list[int]) -> MapTargets:
        """The targets of some rows of the batch (as TextConditioning.select)."""
        return MapTargets(self.concept_mask[rows], self.valid[rows], self.content_mask[rows], self.layers, self.grid)


def map_targets(
    model: BaseModel,
    cond: TextConditioning,
    concepts: Sequence[Sequence[str]],
    map_downsample: int,
    latent_size: tuple[int, int],
) -> MapTargets:
    """The targets of cond's prompts, whose row b names the objects concepts[b], for latents of latent_size (h, w).

    Raises ConceptError naming a concept its prompt does not hold, then ConfigError when no layer works
    at 1/map_downsample of the latent size."""
    located: dict[tuple[str, tuple[str, ...]], list[tuple[int, ...]]] = {}  # a prompt repeated per image: once
    positions = []
    for prompt, names in zip(cond.prompts, concepts, strict=True):
        key = (prompt, tuple(names))
        if key not in located:
            located[key] = locate_concepts(model.tokenizer, prompt, key[1])
        positions.append(located[key])
    layers = tuple(map_layers(model.unet, map_downsample))
    concept_mask, valid = concept_token_mask(positions, cond.input_ids.shape[1])
    content_mask = content_token_mask(cond.input_ids, model.tokenizer.eos_token_id)
    grid = (latent_size[0] // map_downsample, latent_size[1] // map_downsample)
    device = model.device
    return MapTargets(concept_mask.to(device), valid.to(device), content_mask.to(device), layers, grid)


class MapRecorder:
    """Accumulates per-sample object maps over captured layers (and, during sampling, timesteps).

    It reads targets' concept and content masks and grid. `rows` picks the recorded rows of the UNet
    batch (the conditional half under CFG). With keep_tokens, it also keeps the head- and layer-averaged
    probabilities of every token (`token_probs()`, (B, H*W, T)), for methods that renormalise them
    their own way.
    """

    def __init__(
        self,
        targets: MapTargets,
        *,
        rows: slice | None = None,
        local_gradients: bool = False,
        keep_tokens: bool = False,
    ):
        self.concept_mask = targets.concept_mask  # (B, K, T)
        self.content_mask = targets.content_mask  # (B, T)
        self.grid = targets.grid
        self.rows = rows
        self.local_gradients = local_gradients
        self.object_sum: torch.Tensor | float = 0.0  # (B, K, H*W)
        self.content_sum: torch.Tensor | float = 0.0  # (B, H*W)
        self.token_sum: torch.Tensor | float | None = 0.0 if keep_tokens else None  # (B, H*W, T)
        self.count = 0

    def add(self, attention_probs: torch.Tensor, heads: int) -> None:
        """attention_probs: (B_unet * heads, H*W, T) softmax over tokens."""
        n, t = attention_probs.shape[1:]
        probs = attention_probs.float().view(-1, heads, n, t).mean(dim=1)  # (B_unet, H*W, T), heads averaged
        if self.rows is not None:
            probs = probs[self.rows]
        concept_mask = self.concept_mask.to(probs)
        self.object_sum = self.object_sum + torch.einsum("bnt,bkt->bkn", probs, concept_mask)
        self.content_sum = self.content_sum + torch.einsum("bnt,bt->bn", probs, self.content_mask.to(probs))
        if self.token_sum is not None:
            self.token_sum = self.token_sum + probs
        self.count += 1

    def maps(self, normalization: str = "raw") -> torch.Tensor:
        """(B, K, H, W) object maps averaged over everything recorded: raw probabilities, or
        renormalised over the content tokens ("content")."""
        if self.count == 0:
            raise RuntimeError("no attention was recorded")
        maps = self.object_sum / self.count  # (B, K, H*W)
        if normalization == "content":
            maps = maps / (self.content_sum / self.count).clamp_min(CONTENT_EPS)[:, None, :]
        return maps.reshape(*maps.shape[:2], *self.grid)  # (B, K, H, W)

    def mark(self) -> tuple:
        """The running sums now, for `maps_since` (per-step maps of a sampling run)."""
        return self.object_sum, self.content_sum, self.count

    def maps_since(self, mark: tuple, normalization: str = "raw") -> torch.Tensor:
        """(B, K, H, W) object maps of what was recorded after `mark` (as `maps`, over that window only)."""
        object_sum, content_sum, count = mark
        calls = self.count - count
        if calls == 0:
            raise RuntimeError("nothing was recorded since the mark")
        maps = (self.object_sum - object_sum) / calls  # (B, K, H*W)
        if normalization == "content":
            maps = maps / ((self.content_sum - content_sum) / calls).clamp_min(CONTENT_EPS)[:, None, :]
        return maps.reshape(*maps.shape[:2], *self.grid)  # (B, K, H, W)

    def token_probs(self) -> torch.Tensor:
        """(B, H*W, T) attention probabilities averaged over heads, layers and calls (needs keep_tokens)."""
        if self.token_sum is None or self.count == 0:
            raise RuntimeError("token probabilities were not kept or nothing was recorded")
        return self.token_sum / self.count


class CrossAttentionProcessor:
    """attn2 processor that can record explicit attention probabilities and/or use given keys.

    With a recorder it computes `attention_probs` explicitly (softmax(QK^T)), hands them to the
    recorder, then finishes the layer; without one it runs SDPA. `key_weight` replaces the
    module's own `to_k.weight` (the base keys, for the prior loss's eps_base); `keys` replaces the
    key projection's output, one row per row of the batch (each prompt's keys with its own adapter,
    for a sampling batch of several adapters: sepen_core.sampling.generate_batch).
    """

    def __init__(
        self,
        recorder: MapRecorder | None = None,
        key_weight: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ):
        self.recorder = recorder
        self.key_weight = key_weight
        self.keys = keys

    def _key(self, attn: Attention, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.keys is not None:
            return self.keys
        if self.key_weight is not None:
            return F.linear(encoder_hidden_states, self.key_weight.to(encoder_hidden_states.dtype))
        weight = attn.to_k.weight
        if weight.dtype != encoder_hidden_states.dtype:  # fp32 keys trained in a half-precision UNet (finetuning)
            return F.linear(encoder_hidden_states.to(weight.dtype), weight, attn.to_k.bias).to(
                encoder_hidden_states.dtype
            )
        return attn.to_k(encoder_hidden_states)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, H*W, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch_size, seq_len, _ = encoder_hidden_states.shape

        if self.recorder is None:
            out = self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, batch_size, seq_len)
        else:
            out = self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, batch_size, seq_len)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _sdpa(self, attn, hidden_states, encoder_hidden_states, attention_mask, batch_size, seq_len):
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = self._key(attn, encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, N, heads*d) -> (B, heads, N, d)
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, heads*d)

    def _explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, batch_size, seq_len):
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        local = self.recorder.local_gradients
        # "local" gradient mode: the whole forward runs without autograd; only this layer's key
        # projection and softmax are recorded, so its to_k learns through its own maps alone.
        with torch.enable_grad() if local else nullcontext():
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, N, d)
            key = attn.head_to_batch_dim(self._key(attn, encoder_hidden_states))  # (B*heads, T, d)
            attention_probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, N, T)
            self.recorder.add(attention_probs, attn.heads)
        if local:
            attention_probs = attention_probs.detach()
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        return attn.batch_to_head_dim(torch.bmm(attention_probs, value))  # (B, N, heads*d)


def cross_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Every cross-attention module path (`...attn2`), in the UNet's module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and name.endswith(".attn2")]


@contextmanager
def installed_processors(unet: UNet2DConditionModel, processors: dict[str, object]):
    """Install processors keyed by module path (e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2');
    every other layer keeps its own; all are restored on exit."""
    original = unet.attn_processors
    unet.set_attn_processor({**original, **{f"{name}.processor": p for name, p in processors.items()}})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def cross_attention_keys(
    unet: UNet2DConditionModel,
    encoder_hidden_states: torch.Tensor,
    weights: list[tuple[torch.Tensor, dict[str, torch.Tensor] | None]],
) -> dict[str, torch.Tensor]:
    """Every attn2 layer's keys (B, T, inner) of the prompt states, rows by rows with their own key weights:
    weights[i] = (the rows, {`...attn2.to_k.weight`: the weight to use}); None: the layer's own weights."""
    keys = {}
    for name in cross_attention_layers(unet):
        module = unet.get_submodule(name)
        states = (
            module.norm_encoder_hidden_states(encoder_hidden_states) if module.norm_cross else encoder_hidden_states
        )
        layer = torch.empty(*states.shape[:2], module.to_k.out_features, dtype=states.dtype, device=states.device)
        for rows, by_name in weights:
            weight = module.to_k.weight if by_name is None else by_name[f"{name}.to_k.weight"]
            layer[rows] = F.linear(states[rows], weight.to(states.dtype), module.to_k.bias)
        keys[name] = layer
    return keys


def unet_forward(
    unet: UNet2DConditionModel, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning
) -> torch.Tensor:
    """One UNet call with the conditioning's hidden states, attention mask and (SDXL) added conditioning:
    (B, C, h, w) noise prediction."""
    return unet(
        latents,
        timesteps,
        encoder_hidden_states=cond.encoder_hidden_states,
        encoder_attention_mask=cond.encoder_attention_mask,
        added_cond_kwargs=cond.added_cond_kwargs,
    ).sample


def capture_maps(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: TextConditioning,
    targets: MapTargets,
    *,
    local_gradients: bool = False,
    keep_tokens: bool = False,
    compile: bool = False,
) -> MapRecorder:
    """Run the UNet only as far as the last of the targets' layers (forward_until) and return the recorded maps.

    The UNet's output is not needed by the SepEn losses, so stopping early leaves every gradient
    unchanged. local_gradients runs the forward without autograd except inside the capture layers;
    compile runs it through torch.compile (COMPILE_BACKEND).
    """
    recorder = MapRecorder(targets, local_gradients=local_gradients, keep_tokens=keep_tokens)
    forward = compiled_forward_until(COMPILE_BACKEND) if compile else forward_until
    with installed_processors(unet, {name: CrossAttentionProcessor(recorder) for name in targets.layers}):
        with torch.no_grad() if local_gradients else nullcontext():
            forward(unet, latents, timesteps, cond, last_layer(targets.layers))
    return recorder


COMPILE_BACKEND = "inductor"  # torch.compile's own default


@functools.cache
def compiled_forward_until(backend: str):
    """forward_until through torch.compile (one per backend and process; torch recompiles it for new shapes)."""
    return torch.compile(forward_until, backend=backend)


def forward_position(layer: str) -> tuple[int, int, int, int]:
    """Where an attn2 layer runs in the UNet's forward: (down 0 / mid 1 / up 2, block, attention, transformer block)."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return (1, 0, int(parts[2]), int(parts[4]))
    return (0 if parts[0] == "down_blocks" else 2, int(parts[1]), int(parts[3]), int(parts[5]))


def last_layer(layers: Sequence[str]) -> str:
    """Of some attn2 layers, the one the UNet's forward reaches last."""
    return max(layers, key=forward_position)


def forward_until(
    unet: UNet2DConditionModel, latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning, last: str
) -> None:
    """The UNet's forward (UNet2DConditionModel.forward, its SD and SDXL-style paths) up to and including the
    transformer model that holds the attn2 layer `last`, then stop: its output is never computed, by construction
    (no exception), so the maps' consumers (the SepEn losses, diagnostics, Attend-and-Excite) pay only for the
    layers before their maps, and torch.compile can trace it whole."""
    phase, stop_block, stop_attention, _ = forward_position(last)
    sample = latents
    upsample_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % upsample_factor for dim in sample.shape[-2:])
    mask = cond.encoder_attention_mask
    if mask is not None:  # as the UNet's forward turns a 0/1 key mask into an additive bias
        mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    added = cond.added_cond_kwargs or {}  # SDXL's pooled text and time ids join the time embedding
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(
        encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=added
    )
    attend = {"encoder_hidden_states": states, "encoder_attention_mask": mask, "return_dict": False}
    sample = unet.conv_in(sample)

    residuals = (sample,)
    for i, block in enumerate(unet.down_blocks):
        if phase == 0 and i == stop_block:
            for j, (resnet, attention) in enumerate(zip(block.resnets, block.attentions, strict=True)):
                sample = attention(resnet(sample, emb), **attend)[0]
                if j == stop_attention:
                    return
        if getattr(block, "has_cross_attention", False):
            sample, more = block(hidden_states=sample, temb=emb, encoder_hidden_states=states,
                                 encoder_attention_mask=mask)  # fmt: skip
        else:
            sample, more = block(hidden_states=sample, temb=emb)
        residuals += more

    mid = unet.mid_block
    if phase == 1:
        sample = mid.resnets[0](sample, emb)
        for j, attention in enumerate(mid.attentions):
            sample = attention(sample, **attend)[0]
            if j == stop_attention:
                return
            sample = mid.resnets[j + 1](sample, emb)
    if mid is not None:
        if getattr(mid, "has_cross_attention", False):
            sample = mid(sample, emb, encoder_hidden_states=states, encoder_attention_mask=mask)
        else:
            sample = mid(sample, emb)

    for i, block in enumerate(unet.up_blocks):
        skips = residuals[-len(block.resnets) :]
        residuals = residuals[: -len(block.resnets)]
        if i == stop_block:
            for j, (resnet, attention) in enumerate(zip(block.resnets, block.attentions, strict=True)):
                sample = resnet(torch.cat([sample, skips[-1 - j]], dim=1), emb)
                sample = attention(sample, **attend)[0]
                if j == stop_attention:
                    return
        size = residuals[-1].shape[2:] if forward_upsample_size and residuals else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=states,
                           upsample_size=size, encoder_attention_mask=mask)  # fmt: skip
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
    raise ConfigError("map_downsample", f"the UNet's forward never reached {last}")


def base_key_forward(
    unet: UNet2DConditionModel,
    base_keys: dict[str, torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: TextConditioning,
) -> torch.Tensor:
    """The base model's noise prediction: the same UNet with its original attn2.to_k weights, no second copy."""
    processors = {
        name.removesuffix(".to_k.weight"): CrossAttentionProcessor(key_weight=weight)
        for name, weight in base_keys.items()
    }
    with installed_processors(unet, processors), torch.no_grad():
        return unet_forward(unet, latents, timesteps, cond)
