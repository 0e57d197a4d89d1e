"""Base models: load a local diffusers-format Stable Diffusion (1.x/2.x or SDXL) directory, or build a tiny random one.

A BaseModel bundles the components SepEn touches (UNet, text encoder(s), tokenizer(s), schedulers,
optional VAE) with a copy of the UNet's original `attn2.to_k` weights: the prior loss, adapters
and their fingerprint all refer to those base keys, so no second UNet is ever kept in memory.
SDXL conditions its UNet on two text encoders' states side by side, on the second one's pooled
projection and on the image size (micro-conditioning); TextConditioning carries all of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sepen_core.config import BUNDLED_SOURCE, ModelDefaults, tiny_source
from sepen_core.errors import ConfigError, ModelLoadError
from sepen_core.model_card import BUNDLED_MODEL_DIR, model_architecture

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

BUNDLED_TOKENIZER = Path(__file__).parent / "clip_tokenizer"
# The project's own small text-to-image model of the toy world (toyworld/README.md), trained by
# `python -m toyworld.train`: 32x32 pixel space, sample it at guidance 1.0 and read its maps at downsample 2.
TINY_MODEL_ID = "sepen-tiny-random"
TINY_XL_MODEL_ID = "sepen-tiny-xl-random"


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
    # SDXL's added conditioning (UNet2DConditionModel's added_cond_kwargs); None for SD 1.x/2.x.
    pooled_embeds: torch.Tensor | None = None  # (B, P): the second text encoder's projected pooled output
    time_ids: torch.Tensor | None = None  # (B, 6): original size, crop corner, target size, in pixels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        if self.pooled_embeds is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}

    def select(self, rows: torch.Tensor | list[int]) -> TextConditioning:
        rows = torch.as_tensor(rows, dtype=torch.long)

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[rows.to(tensor.device)]

        return TextConditioning(
            [self.prompts[i] for i in rows.tolist()],
            self.input_ids[rows],
            pick(self.encoder_hidden_states),
            pick(self.encoder_attention_mask),
            pick(self.pooled_embeds),
            pick(self.time_ids),
        )

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        def join(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return TextConditioning(
            [s for p in parts for s in p.prompts],
            join("input_ids"),
            join("encoder_hidden_states"),
            join("encoder_attention_mask"),
            join("pooled_embeds"),
            join("time_ids"),
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
    # SDXL's second text encoder (with its projection) and tokenizer; None for SD 1.x/2.x.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL: an empty negative prompt conditions on zeros rather than on the encoded empty prompt (diffusers' flag).
    force_zeros_for_empty_prompt: bool = False
    base_keys: dict[str, torch.Tensor] = field(default_factory=dict)  # original attn2.to_k weights
    base_fingerprint: str = ""

    def __post_init__(self):
        if self.unet.config.in_channels != self.unet.config.out_channels:
            raise ModelLoadError(
                f"{self.model_id}: the UNet takes {self.unet.config.in_channels} channels and predicts "
                f"{self.unet.config.out_channels} (an inpainting or image-conditioned model); sepen samples and "
                "finetunes text-to-image UNets only"
            )
        takes_text_time = self.unet.config.addition_embed_type == "text_time"
        if takes_text_time != (self.text_encoder_2 is not None):
            raise ModelLoadError(
                f"{self.model_id}: an SDXL UNet (addition_embed_type 'text_time') needs the second text encoder "
                "and only it does"
            )
        for module in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if module is not None:
                module.requires_grad_(False)
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
    def architecture(self) -> str:
        """ "sd" (SD 1.x/2.x) or "sdxl" (sepen_core.model_card.ARCHITECTURES)."""
        return "sd" if self.text_encoder_2 is None else "sdxl"

    @property
    def native_latent_size(self) -> tuple[int, int]:
        side = self.unet.config.sample_size
        return (side, side) if isinstance(side, int) else tuple(side)

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BaseModel:
        # SDXL's VAE overflows in fp16 (its config's force_upcast); diffusers decodes in fp32 too.
        upcast_vae = self.architecture == "sdxl" and self.vae is not None and self.vae.config.force_upcast
        for module in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if module is not None:
                module.to(device=device)
                wanted = torch.float32 if module is self.vae and upcast_vae and dtype == torch.float16 else dtype
                if wanted is not None and module.dtype != wanted:
                    module.to(dtype=wanted)
        self.base_keys = {k: v.to(device=device, dtype=dtype) for k, v in self.base_keys.items()}
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], latent_size: tuple[int, int] | None = None) -> TextConditioning:
        """The prompts as the UNet sees them, for latents of `latent_size` (default: the model's native size; only
        SDXL's micro-conditioning depends on it, as the image size it states)."""
        input_ids = _token_ids(self.tokenizer, prompts)
        if self.text_encoder_2 is None:
            hidden = self.text_encoder(input_ids.to(self.device))[0]
            return TextConditioning(
                list(prompts), input_ids, hidden.to(self.dtype), self.cross_attention_mask(input_ids)
            )
        # SDXL, as diffusers' StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states
        # side by side (B, T, D1 + D2), the second encoder's projected pooled output, and the size as time ids.
        first = self.text_encoder(input_ids.to(self.device), output_hidden_states=True)
        second = self.text_encoder_2(_token_ids(self.tokenizer_2, prompts).to(self.device), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        height, width = (side * self.vae_scale_factor for side in (latent_size or self.native_latent_size))
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(prompts), device=self.device)
        return TextConditioning(
            list(prompts),
            input_ids,
            hidden.to(self.dtype),
            self.cross_attention_mask(input_ids),
            second.text_embeds.to(self.dtype),
            time_ids.to(self.dtype),
        )

    def encode_negative_prompts(
        self, prompts: list[str], latent_size: tuple[int, int] | None = None
    ) -> TextConditioning:
        """encode_prompts for the unconditional branch of classifier-free guidance: where the model asks for it
        (SDXL's force_zeros_for_empty_prompt), an empty negative prompt is all zeros, as in diffusers."""
        cond = self.encode_prompts(prompts, latent_size)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            cond.encoder_hidden_states[empty] = 0
            if cond.pooled_embeds is not None:
                cond.pooled_embeds[empty] = 0
        return cond

    def cross_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T) 1 on the keys cross-attention may use: with mask_padding, the prompt's tokens and its first
        end token (never an empty row: the empty prompt keeps its end token); else None (all tokens)."""
        if not self.mask_padding:
            return None
        positions = torch.arange(input_ids.shape[1])
        first_end = (input_ids == self.tokenizer.eos_token_id).float().argmax(dim=1)  # (B,)
        return ((positions[None] >= 1) & (positions[None] <= first_end[:, None])).to(self.device, self.dtype)

    def diffusers_pipeline(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """diffusers' own pipeline of this model's components, with a copy of the UNet (LoRAs loaded into the
        pipeline leave this model as it is): how a diffusers user runs the model and loads exported adapters."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # heavy; only this needs them

        if self.architecture == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=copy.deepcopy(self.unet),
                scheduler=self.scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
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
            ("text_encoder_2", self.text_encoder_2),
            ("vae", self.vae),
            ("tokenizer", self.tokenizer),
            ("tokenizer_2", self.tokenizer_2),
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
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        }
        if self.architecture == "sdxl":
            pipeline = {
                "_class_name": "StableDiffusionXLPipeline",
                **components,
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            }
        else:
            pipeline = {
                "_class_name": "StableDiffusionPipeline",
                **components,
                "safety_checker": [None, None],
                "requires_safety_checker": False,
            }
        index = {
            **pipeline,
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
    """Load a local diffusers-format Stable Diffusion directory (SD 1.x / 2.x or SDXL), offline."""
    import diffusers

    path = Path(path)
    architecture = model_architecture(path)  # ModelLoadError naming what is supported
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    text_encoder_2 = tokenizer_2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = _tokenizer(path / "tokenizer")
        if architecture == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", local_files_only=True
            )
            tokenizer_2 = _tokenizer(path / "tokenizer_2")
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
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=architecture == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return model.to(device, dtype)


def _tokenizer(path: Path) -> CLIPTokenizer:
    return load_clip_tokenizer(path) if path.is_dir() else load_clip_tokenizer()


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, model_max_length) token ids, padded and truncated as the pipelines do."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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


def tiny_xl_unet_config(sample_size: int = 32) -> dict:
    """SDXL's UNet layout, shrunk: no attention at the latent's own size, attn2 layers at 1/2 (down_blocks.1,
    up_blocks.1) and at 1/4 (down_blocks.2, mid_block, up_blocks.0: SDXL's 32x32 maps at 1024 px), more transformer
    blocks deeper down, two text encoders' states (32 + 32), and the text-time embedding (pooled text + 6 time ids)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64),
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def _tiny_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
    )


def build_tiny_model(
    seed: int = 0, *, sample_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """A random SD-1.x-shaped model (about 4 M parameters) with the real CLIP tokenizer; seconds on a CPU."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size))
    text_encoder = CLIPTextModel(_tiny_text_config())
    model = BaseModel(
        unet.eval(),
        text_encoder.eval(),
        load_clip_tokenizer(),
        _tiny_scheduler(DDIMScheduler),
        _tiny_vae(sample_size).eval(),
        f"{TINY_MODEL_ID}-{seed}",
    )
    return model.to(device, dtype)


def build_tiny_xl_model(
    seed: int = 0, *, sample_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """A random SDXL-shaped model (tiny_xl_unet_config, two text encoders, Euler sampling as SDXL's own
    scheduler) with the real CLIP tokenizer; seconds on a CPU."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_xl_unet_config(sample_size))
    text_encoder = CLIPTextModel(_tiny_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config())
    model = BaseModel(
        unet.eval(),
        text_encoder.eval(),
        load_clip_tokenizer(),
        _tiny_scheduler(EulerDiscreteScheduler, timestep_spacing="leading"),
        _tiny_vae(sample_size).eval(),
        f"{TINY_XL_MODEL_ID}-{seed}",
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=load_clip_tokenizer(),
        force_zeros_for_empty_prompt=True,
    )
    return model.to(device, dtype)


def _tiny_vae(sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
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


def _tiny_scheduler(scheduler_class: type, **settings):
    """Stable Diffusion's noise schedule (scaled linear, 0.00085 to 0.012) in a scheduler of the given class."""
    if scheduler_class is DDIMScheduler:
        settings = {"clip_sample": False, "set_alpha_to_one": False, **settings}
    return scheduler_class(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **settings
    )


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    model_id: str | None = None,
) -> BaseModel:
    """The one way a model is named: "toy" (the bundled toy-world model), "tiny" or "tiny:SEED" (the tiny
    random model), "tiny-xl" or "tiny-xl:SEED" (the tiny random model in SDXL's layout), or a local diffusers-format
    Stable Diffusion (1.x/2.x or SDXL) directory. dtype: a DTYPES name or a torch dtype; model_id: the name adapters
    record as their base model (default: the model's own id)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"{dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    spec = str(spec)
    tiny = tiny_source(spec)
    if tiny is not None:
        architecture, seed = tiny
        build = build_tiny_xl_model if architecture == "sdxl" else build_tiny_model
        model = build(seed, device=device, dtype=dtype)
        model.model_id = model_id or model.model_id
        return model
    path = BUNDLED_MODEL_DIR if spec == BUNDLED_SOURCE else Path(spec)
    return load_base_model(path, device=device, dtype=dtype, model_id=model_id)
