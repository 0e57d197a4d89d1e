"""What a base model says about itself without being loaded (no torch): its native image size, its defaults and, for
a toy-world model, the nouns it draws, its closed vocabulary. The gateway derives each model's request limits from it
and checks the concepts a request names against its vocabulary; only workers load models."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepen_core.config import BUNDLED_SOURCE, ModelDefaults, tiny_source
from sepen_core.errors import ConfigError, ModelLoadError

BUNDLED_MODEL_DIR = Path(__file__).parent / "bundled" / "sepen-toy"
TINY_NATIVE_SIDE = 64  # the tiny random models: a 32-pixel latent, a VAE that halves
TINY_VAE_SCALE = 2
LATENT_MULTIPLE = 8  # latent sides a multiple of this: the UNets' down- and upsampling meet again
MAX_SIDE_FACTOR = 2  # a request may ask for up to twice the model's native height and width
# The UNet layouts sepen finetunes: "sd", SD 1.x/2.x (StableDiffusionPipeline and its family), and "sdxl"
# (StableDiffusionXLPipeline). Adapters record theirs (sepen_core.adapter_file).
ARCHITECTURES = ("sd", "sdxl")
SUPPORTED = (
    "diffusers-format directories of Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL "
    "(StableDiffusionXLPipeline): UNets whose cross-attention layers have key projections (attn2.to_k)"
)


@dataclass(frozen=True)
class ModelCard:
    native_height: int
    native_width: int
    defaults: ModelDefaults
    nouns: tuple[str, ...] = ()  # the objects a toy-world model draws (its world.json); none for other models
    judge: str | None = None  # "module:function" that reads which objects its images hold (sepen_core.evaluation)
    path: Path | None = None  # its directory; None for the built-in tiny models
    architecture: str = "sd"  # "sd" (SD 1.x/2.x) or "sdxl" (ARCHITECTURES)
    vae_scale: int = 1  # pixels per latent pixel (1: a model without a VAE, such as the bundled toy model)

    @property
    def vocabulary(self) -> tuple[str, ...] | None:
        """The only nouns the model can draw, which the concepts of a request must come from: a toy-world model's
        (its world.json); None for an open vocabulary (the tiny models, real checkpoints), where any word goes."""
        return self.nouns or None

    def check_vocabulary(self, named: Iterable[tuple[str, str]], model: str) -> None:
        """ConfigError naming the field of the first concept the model cannot draw, with the nouns it can. `named`:
        (the request's field, the concept it names) pairs; `model`: the model's name in the message."""
        vocabulary = self.vocabulary
        if vocabulary is None:
            return
        known = {noun.lower() for noun in vocabulary}
        for field, concept in named:
            if concept.strip().lower() not in known:
                raise ConfigError(
                    field,
                    f"model {model!r} cannot draw {concept!r}: its vocabulary is closed, {len(vocabulary)} nouns "
                    f"({', '.join(vocabulary)}); name one of them, or use a model with an open vocabulary",
                )

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this."""
        return size_multiple(self.vae_scale)

    @property
    def max_height(self) -> int:
        return self.native_height * MAX_SIDE_FACTOR

    @property
    def max_width(self) -> int:
        return self.native_width * MAX_SIDE_FACTOR

    def batch_signature(self, sample: dict[str, Any], recorded: bool) -> tuple | None:
        """What sepen_core.sampling.batch_key compares, from a request's sample settings and this card alone
        (recorded: the request names objects whose maps it records). Requests for this model with equal
        signatures can share one UNet batch; None for a request sampled alone (Attend-and-Excite). Raises
        ConfigError for settings no SampleConfig takes."""
        config = self.defaults.sample_config(sample)
        if config.guidance_method != "none":
            return None
        return (
            config.height or self.native_height,
            config.width or self.native_width,
            config.num_inference_steps,
            config.guidance_scale > 1.0,
            config.maps if recorded else None,
        )


def model_card(source: str) -> ModelCard:
    """The card of a model source as SEPEN_MODELS names it: "toy", "tiny[-xl][:SEED]" or a diffusers directory."""
    tiny = tiny_source(source)
    if tiny is not None:
        return ModelCard(
            TINY_NATIVE_SIDE, TINY_NATIVE_SIDE, ModelDefaults(), architecture=tiny[0], vae_scale=TINY_VAE_SCALE
        )
    path = BUNDLED_MODEL_DIR if source == BUNDLED_SOURCE else Path(source)
    index = _model_index(path)
    architecture = _architecture(path, index)
    try:
        unet = _json(path / "unet" / "config.json")
        vae = _json(path / "vae" / "config.json") if (path / "vae").is_dir() else None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: not a readable diffusers model directory ({exc})") from exc
    side = unet.get("sample_size", 64)
    latent_h, latent_w = (side, side) if isinstance(side, int) else side
    scale = 1 if vae is None else 2 ** (len(vae["block_out_channels"]) - 1)
    defaults = ModelDefaults.from_dict(index.get("sepen_defaults", {}))
    nouns = _world_nouns(path / "world.json")
    judge = index.get("sepen_judge")
    return ModelCard(latent_h * scale, latent_w * scale, defaults, nouns, judge, path, architecture, vae_scale=scale)


def size_multiple(vae_scale: int) -> int:
    """What image heights and widths must be multiples of, for a model whose VAE scales by `vae_scale`."""
    return vae_scale * LATENT_MULTIPLE


def model_architecture(path: Path) -> str:
    """ "sd" or "sdxl": which of the supported layouts (ARCHITECTURES) a diffusers model directory holds, from its
    components (any pipeline class of the SD family with a UNet loads; SDXL has a second text encoder); ModelLoadError
    naming what is supported otherwise."""
    return _architecture(path, _model_index(path))


def _model_index(path: Path) -> dict:
    """A model directory's model_index.json ({} without one); ModelLoadError when the directory is missing or the
    file unreadable."""
    if not path.is_dir():
        raise ModelLoadError(f"base model directory {str(path)!r} does not exist")
    try:
        return _json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(path)!r}: unreadable model_index.json ({exc})") from exc


def _architecture(path: Path, index: dict) -> str:
    pipeline = index.get("_class_name")
    if not (path / "unet").is_dir():
        what = f"a {pipeline}" if pipeline else "not a diffusers UNet model"
        has = " with a transformer, no UNet" if (path / "transformer").is_dir() else ""
        raise ModelLoadError(f"{str(path)!r} is {what}{has}; sepen supports {SUPPORTED}")
    sdxl = pipeline == "StableDiffusionXLPipeline" or (path / "text_encoder_2").is_dir()
    architecture = "sdxl" if sdxl else "sd"
    parts = ("text_encoder", "scheduler") + (("text_encoder_2",) if sdxl else ())
    for part in parts:
        if not (path / part).is_dir():
            raise ModelLoadError(f"{str(path)!r} lacks '{part}/'; sepen supports {SUPPORTED}")
    return architecture


def _world_nouns(path: Path) -> tuple[str, ...]:
    """The nouns of the world a toy-world model was trained on (toyworld's world.json beside its weights)."""
    if not path.is_file():
        return ()
    try:
        return tuple(glyph["noun"] for glyph in _json(path)["glyphs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a toy world's definition ({exc!r})") from exc


def _json(path: Path) -> dict:
    return json.loads(path.read_text())
