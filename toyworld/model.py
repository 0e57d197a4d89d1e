"""The toy base model: a pixel-space UNet with cross-attention at 16x16 and 8x8, a small CLIP text encoder, v-pred."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sepen_core.config import ModelDefaults
from sepen_core.models import BaseModel, TextConditioning, load_clip_tokenizer

TOY_MODEL_ID = "sepen-toy"  # the name the service serves it under (sepen_store.settings.DEFAULT_MODELS)
# What the toy model needs where a request is silent (saved in its model_index.json).
TOY_DEFAULTS = ModelDefaults(
    # 20 DDIM steps suffice at 32x32; classifier-free guidance above ~1.5 breaks this model (toyworld/README.md).
    sample={"num_inference_steps": 20, "guidance_scale": 1.0},
    # Downsample 2 reads the 3 attn2 layers at 16x16 (down_blocks.1, up_blocks.1); 4 would read the 4 at
    # 8x8 (down_blocks.2, mid_block, up_blocks.0), where an 8-11 px object covers only 2-3 cells.
    maps={"map_downsample": 2},
    # Chosen on world v2's validation pairs (docs/toyworld-benchmark.md, "Recipes"): per pair, lr 1e-4 with the
    # paper's pseudo-latents gained 5.7 points where 1e-3 lost 7.3; the paper's 8e-6 barely moves this model.
    finetune={"learning_rate": 1e-4, "batch_size": 8, "steps": 150},
    # Large-scale, chosen the same way: lr 3e-4 gained 10.9 points over 16 validation pairs (1e-3: +1.6, 1e-4: +7.8).
    large_scale={"learning_rate": 3e-4, "batch_size": 8, "steps": 300},
)


@dataclass(frozen=True)
class ToyModelConfig:
    """Everything that shapes the toy model; saved with every trained model (training.json)."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = 2  # per cross-attention layer (diffusers calls this attention_head_dim)
    norm_num_groups: int = 8
    text_hidden_size: int = 64  # also the UNet's cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate_size: int = 256
    max_length: int = 16  # the tokenizer's model_max_length: start token, up to 14 prompt tokens, end token
    # Pixel space at 32x32: DDPM's linear schedule; DDIM sampling with trailing timesteps, x0 clipped to [-1, 1].
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ToyModelConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def unet_config(config: ToyModelConfig) -> dict:
    levels = len(config.block_out_channels)
    return dict(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.attention_heads,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
    )


def build_toy_model(config: ToyModelConfig | None = None, seed: int = 0) -> BaseModel:
    """A randomly initialised toy model with the real CLIP tokenizer cut to config.max_length tokens."""
    config = config or ToyModelConfig()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(config))
    tokenizer = load_clip_tokenizer()
    tokenizer.model_max_length = config.max_length  # saved in the tokenizer's config: samplers and pipelines respect it
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            projection_dim=config.text_hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    return BaseModel(
        unet.eval(),
        text_encoder.eval(),
        tokenizer,
        scheduler,
        None,
        TOY_MODEL_ID,
        mask_padding=True,
        defaults=TOY_DEFAULTS,
    )


def trainable_conditioning(model: BaseModel, prompts: list[str]) -> TextConditioning:
    """model.encode_prompts with autograd through the text encoder (it trains jointly with the UNet).

    Same tokens, hidden states and cross-attention mask as sampling sees (a test checks it)."""
    tokens = model.tokenizer(
        prompts, padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids  # (B, T)
    hidden = model.text_encoder(input_ids.to(model.device))[0]  # (B, T, D)
    return TextConditioning(list(prompts), input_ids, hidden, model.cross_attention_mask(input_ids))
