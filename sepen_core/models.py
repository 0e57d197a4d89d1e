"""Base models: load a local diffusers-format Stable Diffusion directory, or build a tiny random one.

A BaseModel bundles the components SepEn touches (UNet, text encoder, tokenizer, schedulers,
optional VAE) with a copy of the UNet's original `attn2.to_k` weights: the prior loss, adapters
and their fingerprint all refer to those base keys, so no second UNet is ever kept in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sepen_core.config import BUNDLED_SOURCE, TINY_SOURCE, ModelDefaults
from sepen_core.errors import ConfigError, ModelLoadError
from sepen_core.model_card import BUNDLED_MODEL_DIR

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

BUNDLED_TOKENIZER = Path(__file__).parent / "clip_tokenizer"
# The project's own small text-to-image model of the toy world (toyworld/README.md), trained by
# `python -m toyworld.train`: 32x32 pixel space, sample it at guidance 1.0 and read its maps at downsample 2.
TINY_MODEL_ID = "sepen-tiny-random"


def load_clip_tokenizer(path: Path = BUNDLED_TOKENIZER) -> CLIPTokenizer:
    """CLIP's BPE tokenizer from a directory holding vocab.json and merges.txt (bundled by default)."""
    # from_pretrained on a directory: transformers 5 ignores the old vocab_file=/merges_file= keywords.
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def key_projection_weights(unet: UNet2DConditionModel) -> dict[str, torch.nn.Parameter]:
    """Every cross-attention key projection's own weight by its plain state-dict name (`...attn2.to_k.weight`),
    sorted. Where PEFT wraps a layer in a LoRA layer (`pipe.load_lora_weights`), this is its base layer's weight:
    the LoRA's own matrices stay outside it until fused."""
    weights = {}
    for path, module in unet.named_modules():
        if path.endswith(".attn2.to_k"):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weights[f"{path}.weight"] = base.weight
    return dict(sorted(weights.items()))


def key_projection_names(unet: UNet2DConditionModel) -> list[str]:
    """State-dict names of every cross-attention key projection (`...attn2.to_k.weight`), sorted."""
    return list(key_projection_weights(unet))


def key_fingerprint(keys: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and fp16 bytes of key matrices: equal for fp16 and fp32 copies of a model."""
    digest = hashlib.sha256()
    for name in sorted(keys):
        digest.update(name.encode())
        digest.update(keys[name].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TextConditioning:
    """Tokenised and encoded prompts, exactly as the UNet sees them."""

    prompts: list[str]
    input_ids: torch.Tensor  # (B, T) token ids, start token at 0
    encoder_hidden_states: torch.Tensor  # (B, T, D)
    encoder_attention_mask: torch.Tensor | None = None  # (B, T) 1 = attend; None = all tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> TextConditioning:
        rows = torch.as_tensor(rows, dtype=torch.long)
        mask = (
            None
            if self.encoder_attention_mask is None
            else self.encoder_attention_mask[rows.to(self.encoder_attention_mask.device)]
        )
        return TextConditioning(
            [self.prompts[i] for i in rows.tolist()],
            self.input_ids[rows],
            self.encoder_hidden_states[rows.to(self.encoder_hidden_states.device)],
            mask,
        )

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        masks = [p.encoder_attention_mask for p in parts]
        mask = None if any(m is None for m in masks) else torch.cat(masks)
        return TextConditioning(
            [s for p in parts for s in p.prompts],
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.encoder_hidden_states for p in parts]),
            mask,
        )


@dataclass
class BaseModel:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: object  # the model's own sampling scheduler (diffusers SchedulerMixin)
    vae: AutoencoderKL | None
    model_id: str
    # Mask the start token and the padding out of cross-attention, so the keys are the prompt's own
    # tokens and its first end token (small models trained from scratch need it: TOYWORLD.md).
    mask_padding: bool = False
    # Sampling, map and recipe settings this model needs where a request is silent (none: the paper's).
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    base_keys: dict[str, torch.Tensor] = field(default_factory=dict)  # original attn2.to_k weights
    base_fingerprint: str = ""

    def __post_init__(self):
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.base_keys = {name: w.detach().clone() for name, w in key_projection_weights(self.unet).items()}
        if not self.base_keys:
            raise ModelLoadError(f"{self.model_id}: the UNet has no cross-attention (attn2.to_k) layers")
        self.base_fingerprint = key_fingerprint(self.base_keys)
        # Training noise follows the model's own beta schedule and prediction type.
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)

    # Read from a base key, which `to()` moves with the model: diffusers' ModelMixin.device walks the modules
    # (offload hooks), and hot loops ask for the device several times per step (the GPU profile in toyworld/README).
    @property
    def device(self) -> torch.device:
        return next(iter(self.base_keys.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.base_keys.values())).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BaseModel:
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.to(device=device)
                if dtype is not None and module.dtype != dtype:
                    module.to(dtype=dtype)
        self.base_keys = {k: v.to(device=device, dtype=dtype) for k, v in self.base_keys.items()}
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids
        hidden = self.text_encoder(input_ids.to(self.device))[0]
        return TextConditioning(list(prompts), input_ids, hidden.to(self.dtype), self.cross_attention_mask(input_ids))

    def cross_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) 1 on the keys cross-attention may use: with mask_padding, the prompt's tokens and its first
        end token (never an empty row: the empty prompt keeps its end token); else None (all tokens)."""
        if not self.mask_padding:
            return None
        positions = torch.arange(input_ids.shape[1])
        first_end = (input_ids == self.tokenizer.eos_token_id).float().argmax(dim=1)  # (B,)
        return ((positions[None] >= 1) & (positions[None] <= first_end[:, None])).to(self.device, self.dtype)

    def diffusers_pipeline(self) -> StableDiffusionPipeline:
        """diffusers' own pipeline of this model's components, with a copy of the UNet (LoRAs loaded into the
        pipeline leave this model as it is): how a diffusers user runs the model and loads exported adapters."""
        from diffusers import StableDiffusionPipeline  # its module tree is heavy; only this needs it

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=copy.deepcopy(self.unet),
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers-format directory that load_base_model and StableDiffusionPipeline both read."""
        path = Path(path)
        for name, module in (
            ("unet", self.unet),
            ("text_encoder", self.text_encoder),
            ("vae", self.vae),
            ("tokenizer", self.tokenizer),
            ("scheduler", self.scheduler),
        ):
            if module is not None:
                module.save_pretrained(path / name)
        components = {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": ["diffusers", "AutoencoderKL"] if self.vae is not None else [None, None],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        }
        index = {
            "_class_name": "StableDiffusionPipeline",
            **components,
            "requires_safety_checker": False,
            "sepen_model_id": self.model_id,
            "sepen_mask_padding": self.mask_padding,
            "sepen_defaults": self.defaults.to_dict(),
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_base_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_id: str | None = None,
) -> BaseModel:
    """Load a local diffusers-format Stable Diffusion directory (SD 1.x / 2.x), offline."""
    import diffusers

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"base model directory {str(path)!r} does not exist")
    for part in ("unet", "text_encoder", "scheduler"):
        if not (path / part).is_dir():
            raise ModelLoadError(f"{str(path)!r} is not a diffusers Stable Diffusion directory: '{part}/' is missing")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = load_clip_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else load_clip_tokenizer()
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"), DDIMScheduler)
        scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        vae = (
            AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
            if (path / "vae").is_dir()
            else None
        )
        defaults = ModelDefaults.from_dict(index.get("sepen_defaults", {}))
    except ConfigError as exc:
        raise ModelLoadError(f"{str(index_file)!r} has invalid {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load base model from {str(path)!r}: {exc}") from exc
    model = BaseModel(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        vae,
        model_id or index.get("sepen_model_id") or path.resolve().name,
        mask_padding=bool(index.get("sepen_mask_padding", False)),
        defaults=defaults,
    )
    return model.to(device, dtype)


def tiny_unet_config(sample_size: int = 32) -> dict:
    """SD 1.x's UNet layout (16 attn2 layers, maps at latent/4 in down_blocks.2 and up_blocks.1), shrunk."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_tiny_model(
    seed: int = 0, *, sample_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """A random SD-1.x-shaped model (about 4 M parameters) with the real CLIP tokenizer; seconds on a CPU."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=sample_size * 2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    model = BaseModel(
        unet.eval(), text_encoder.eval(), load_clip_tokenizer(), scheduler, vae.eval(), f"{TINY_MODEL_ID}-{seed}"
    )
    return model.to(device, dtype)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    model_id: str | None = None,
) -> BaseModel:
    """The one way a model is named: "toy" (the bundled toy-world model), "tiny" or "tiny:SEED" (the tiny
    random model), or a local diffusers-format Stable Diffusion directory. dtype: a DTYPES name or a torch dtype;
    model_id: the name adapters record as their base model (default: the model's own id)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"{dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    spec = str(spec)
    if spec == TINY_SOURCE or spec.startswith(f"{TINY_SOURCE}:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdecimal():
            raise ConfigError("model", f"{spec!r}: the tiny model's seed must be a whole number, as in tiny:3")
        model = build_tiny_model(int(seed_text), device=device, dtype=dtype)
        model.model_id = model_id or model.model_id
        return model
    path = BUNDLED_MODEL_DIR if spec == BUNDLED_SOURCE else Path(spec)
    return load_base_model(path, device=device, dtype=dtype, model_id=model_id)
