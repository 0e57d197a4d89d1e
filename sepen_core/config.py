"""Settings of every sepen_core operation as frozen dataclasses, validated on construction.

Torch-free: the gateway validates requests with these same classes, and every artifact
(adapter, checkpoint) stores the config that made it via `to_dict()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sepen_core.errors import ConfigError

NORMALIZATIONS = ("raw", "content")
GRAD_MODES = ("exact", "local")
LATENT_SOURCES = ("pseudo", "generated", "trajectory", "attend-excite")
# The sources whose pool holds sampling trajectories (their latents at the steps of `trajectory_window`).
TRAJECTORY_SOURCES = ("trajectory", "attend-excite")
# Model sources that are not directories (models.load_model): the bundled toy-world model, the tiny random model.
BUNDLED_SOURCE = "toy"
TINY_SOURCE = "tiny"
TINY_XL_SOURCE = "tiny-xl"  # the tiny random model in SDXL's layout
DTYPE_NAMES = ("fp32", "fp16", "bf16")
# How sampling steers the latents beyond the prompt (SampleConfig.guidance_method): "none", or Attend-and-Excite
# (sepen_core.attend_excite), which lifts the weakest named object's attention during the first steps at test time.
GUIDANCE_METHODS = ("none", "attend-excite")
# A&E's step size (scale_factor; published: 20): what is meaningful (a random tiny model's maps need 2000 to react);
# the service allows less (sepen_store.contract.Limits.max_excite_scale).
MAX_EXCITE_SCALE = 10_000.0
# Attend-and-Excite's published schedule, AttendExciteConfig's defaults, here so that the gateway bounds its cost
# without torch: latent updates at the first AE_STEPS_TO_ALTER of the steps, and at the steps at these fractions of the
# schedule up to AE_MAX_REFINEMENT_STEPS more, until each object's peak reaches the threshold.
AE_STEPS_TO_ALTER = 0.5
AE_REFINEMENT = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}
AE_MAX_REFINEMENT_STEPS = 20
# What one A&E gradient evaluation (a forward to the last map layer and its backward, the conditional rows only) costs,
# at most, in plain denoising steps of the same image: measured medians 1.71 (toy model, no classifier-free guidance)
# and 0.75 (tiny model, guided: a plain step there runs two rows), the highest single run 3.51, when the machine's load
# rose during its A&E half (bench/attend_excite_cost.py, docs/benchmarks.md "Attend-and-Excite's cost").
AE_UPDATE_COST = 4.0


def tiny_source(spec: str) -> tuple[str, int] | None:
    """("sd" or "sdxl", seed) when `spec` names a tiny random model ("tiny", "tiny:3", "tiny-xl", "tiny-xl:3"),
    else None; ConfigError for a seed that is not a whole number."""
    for name, architecture in ((TINY_XL_SOURCE, "sdxl"), (TINY_SOURCE, "sd")):
        if spec == name or spec.startswith(f"{name}:"):
            seed = spec.partition(":")[2] or "0"
            _check(seed.isdecimal(), "model", f"{spec!r}: the tiny model's seed must be a whole number, as in {name}:3")
            return architecture, int(seed)
    return None


def attend_excite_evaluations(steps: int) -> int:
    """The most gradient evaluations Attend-and-Excite's published schedule makes in `steps` sampling steps: one at
    each of the first AE_STEPS_TO_ALTER of them, and up to AE_MAX_REFINEMENT_STEPS more at each refinement step among
    them (sepen_core.attend_excite.AttendExcite.update)."""
    altered = round(AE_STEPS_TO_ALTER * steps)
    refining = {round(f * steps) for f in AE_REFINEMENT if round(f * steps) < altered}
    return altered + AE_MAX_REFINEMENT_STEPS * len(refining)


def guidance_cost(method: str, steps: int) -> float:
    """What an image of `steps` sampling steps costs with guidance `method`, in images of plain sampling, at most:
    1 for "none"; for "attend-excite", 1 + AE_UPDATE_COST x its most gradient evaluations / steps (a bound from its
    schedule: an image whose objects pass the thresholds early costs less, docs/benchmarks.md)."""
    _check(method in GUIDANCE_METHODS, "guidance_method", f"must be one of {GUIDANCE_METHODS}")
    if method == "none":
        return 1.0
    return 1.0 + AE_UPDATE_COST * attend_excite_evaluations(steps) / steps


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; expected one of {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class MapConfig(_Serializable):
    """Which cross-attention maps the SepEn losses and diagnostics read (METHOD.md section 2)."""

    # Maps are read from every attn2 layer whose query grid is the latent grid divided by this
    # (4: 16x16 maps for 64x64 latents, the 5 layers of SD 1.x down_blocks.2 and up_blocks.1).
    map_downsample: int = 4
    # "raw": softmax over all tokens (the paper); "content": renormalised over content tokens.
    normalization: str = "raw"
    smoothing_sigma: float = 0.5

    def __post_init__(self):
        _check(self.map_downsample in (1, 2, 4, 8, 16, 32), "map_downsample", "must be a power of two from 1 to 32")
        _check(self.normalization in NORMALIZATIONS, "normalization", f"must be one of {NORMALIZATIONS}")
        _check(0 < self.smoothing_sigma <= 10, "smoothing_sigma", "must be in (0, 10]")


def check_low_rank(rank: int | None, energy: float | None) -> None:
    """ConfigError naming the field unless `rank` (a whole number from 1 to MAX_EXPORT_RANK) or `energy` (a share
    in (0, 1]) or neither is given: how an adapter is stored low-rank (FinetuneConfig, KeyProjectionAdapter.low_rank)
    or exported as a LoRA (ExportOptions)."""
    _check(rank is None or energy is None, "energy", "give rank or energy, not both")
    _check(
        rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= MAX_EXPORT_RANK),
        "rank",
        f"must be a whole number from 1 to {MAX_EXPORT_RANK}",
    )
    _check(
        energy is None or (isinstance(energy, (int, float)) and not isinstance(energy, bool) and 0 < energy <= 1),
        "energy",
        "must be a fraction in (0, 1]: the share of squared singular values kept",
    )


@dataclass(frozen=True)
class FinetuneConfig(_Serializable):
    """A SepEn finetuning recipe. Defaults are the paper's single-pair recipe (METHOD.md section 5)."""

    steps: int = 200
    learning_rate: float = 8e-6
    batch_size: int = 4
    lambda_sep: float = 1.0
    lambda_en: float = 0.5
    prior_weight: float = 0.0
    seed: int = 0
    # "exact": gradients identical to a whole-UNet forward; "local": each layer's key gets
    # gradient only through its own maps (faster, approximate; see docs/benchmarks.md).
    grad_mode: str = "exact"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    # Side of the pseudo-latents in latent pixels; None uses the UNet's sample_size.
    latent_size: int | None = None
    # Where each step's noisy latents come from, all without training images: "pseudo" (the paper: Gaussian x0 noised
    # at a uniform timestep), "generated" (the base model's own samples of training prompts, made once before
    # training, noised the same way), "trajectory" (the base model's own sampling trajectories of training prompts: the
    # latents it denoises at the steps of trajectory_window, where an object is kept or lost), "attend-excite"
    # (Attend-and-Excite's samples of training prompts, its final latents noised at the window's timesteps: with
    # teacher_weight > 0, A&E is the teacher).
    latents: str = "pseudo"
    latent_pool: int = 64  # every source but "pseudo": how many samples are made and drawn from
    # The share of the model's sampling steps the trajectory sources take their latents or timesteps from: (0.35, 0.7)
    # is steps 8-14 of 20, where the toy model's maps start to say which object goes missing.
    trajectory_window: tuple[float, float] = (0.35, 0.7)
    # latents="attend-excite": weight of the teacher's loss, the denoising loss towards A&E's samples (the adapter's
    # plain prediction learns where A&E's latent updates lead, paid once at finetune time); 0: SepEn's losses only.
    teacher_weight: float = 0.0
    maps: MapConfig = field(default_factory=MapConfig)
    # torch.compile the map-capture forward (sepen_core.attention.forward_until, one graph): a slow first step,
    # then faster steps on a GPU; the gradients are the same.
    compile: bool = False
    # How the adapter is stored (training is the same: full-rank key weights are trained): a rank-r factorisation of
    # each layer's delta (rank), or per layer the smallest rank keeping this share of the squared singular values
    # (energy); neither: the full delta. A full-rank SDXL key delta is ~340 MB in fp16.
    rank: int | None = None
    energy: float | None = None
    # The do-no-harm check when training ends (sepen_core.harm_check): images per prompt and side on the adapter's own
    # pairs (both orders) and nouns alone, against the base model on held-out seeds; 0: no check.
    check_samples: int = 16

    def __post_init__(self):
        _check(
            isinstance(self.check_samples, int) and 0 <= self.check_samples <= 64,
            "check_samples",
            "must be an integer from 0 (no check) to 64",
        )
        _check(
            isinstance(self.steps, int) and 1 <= self.steps <= 1_000_000,
            "steps",
            "must be an integer from 1 to 1,000,000",
        )
        _check(0 < self.learning_rate <= 1.0, "learning_rate", "must be in (0, 1]")
        _check(
            isinstance(self.batch_size, int) and 1 <= self.batch_size <= 256,
            "batch_size",
            "must be an integer from 1 to 256",
        )
        _check(0 <= self.lambda_sep <= 100, "lambda_sep", "must be in [0, 100]")
        _check(0 <= self.lambda_en <= 100, "lambda_en", "must be in [0, 100]")
        _check(
            self.lambda_sep + self.lambda_en + self.teacher_weight > 0,
            "lambda_sep",
            "lambda_sep, lambda_en and teacher_weight cannot all be 0",
        )
        _check(0 <= self.teacher_weight <= 100, "teacher_weight", "must be in [0, 100]")
        _check(
            self.teacher_weight == 0 or self.latents == "attend-excite",
            "teacher_weight",
            'needs latents "attend-excite" (the teacher\'s samples)',
        )
        window = self.trajectory_window
        _check(
            len(window) == 2 and all(isinstance(w, (int, float)) for w in window) and 0 <= window[0] < window[1] <= 1,
            "trajectory_window",
            "must be two shares of the sampling steps, 0 <= start < end <= 1",
        )
        _check(0 <= self.prior_weight <= 100, "prior_weight", "must be in [0, 100]")
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**31, "seed", "must be an integer in [0, 2^31)")
        _check(self.grad_mode in GRAD_MODES, "grad_mode", f"must be one of {GRAD_MODES}")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be positive")
        _check(0 <= self.weight_decay < 1, "weight_decay", "must be in [0, 1)")
        _check(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            "must be two numbers in [0, 1)",
        )
        _check(
            self.latent_size is None
            or (isinstance(self.latent_size, int) and 8 <= self.latent_size <= 256 and self.latent_size % 8 == 0),
            "latent_size",
            "must be a multiple of 8 from 8 to 256, or null for the model's own",
        )
        _check(self.latents in LATENT_SOURCES, "latents", f"must be one of {LATENT_SOURCES}")
        _check(isinstance(self.compile, bool), "compile", "must be true or false")
        _check(
            isinstance(self.latent_pool, int) and 1 <= self.latent_pool <= 4096,
            "latent_pool",
            "must be an integer from 1 to 4096",
        )
        check_low_rank(self.rank, self.energy)
        if isinstance(self.maps, dict):  # from_dict / JSON
            object.__setattr__(self, "maps", MapConfig.from_dict(self.maps))

    @classmethod
    def large_scale(cls, **overrides) -> FinetuneConfig:
        """The paper's large-scale recipe: 10k steps, lr 4e-6, prior (norm) loss weight 0.5."""
        return cls(**{"steps": 10_000, "learning_rate": 4e-6, "prior_weight": 0.5, **overrides})


@dataclass(frozen=True)
class SampleConfig(_Serializable):
    """Text-to-image sampling. Defaults follow the paper's inference setting (METHOD.md section 5)."""

    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    height: int | None = None  # image pixels; None: the model's native size
    width: int | None = None
    num_images: int = 1
    seed: int = 0  # image i uses seed + i, so each image is reproducible on its own
    negative_prompt: str = ""
    maps: MapConfig = field(default_factory=MapConfig)
    # GUIDANCE_METHODS: "attend-excite" runs Attend-and-Excite on the request's concepts (which it needs), one request
    # per sampling batch, with step size excite_scale (its scale_factor); it costs guidance_cost() images per image.
    guidance_method: str = "none"
    excite_scale: float = 20.0

    def __post_init__(self):
        _check(
            self.guidance_method in GUIDANCE_METHODS,
            "guidance_method",
            f"{self.guidance_method!r} is not one of {', '.join(GUIDANCE_METHODS)}",
        )
        _check(
            isinstance(self.excite_scale, int | float)
            and not isinstance(self.excite_scale, bool)
            and 0 < self.excite_scale <= MAX_EXCITE_SCALE,
            "excite_scale",
            f"must be a number in (0, {MAX_EXCITE_SCALE:g}]: Attend-and-Excite's step size (published: 20)",
        )
        _check(
            isinstance(self.num_inference_steps, int) and 1 <= self.num_inference_steps <= 1000,
            "num_inference_steps",
            "must be an integer from 1 to 1000",
        )
        _check(0 <= self.guidance_scale <= 50, "guidance_scale", "must be in [0, 50]")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and 8 <= value <= 2048 and value % 8 == 0),
                name,
                "must be a multiple of 8 from 8 to 2048",
            )
        _check(
            isinstance(self.num_images, int) and 1 <= self.num_images <= 64,
            "num_images",
            "must be an integer from 1 to 64",
        )
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2**31, "seed", "must be an integer in [0, 2^31)")
        _check(len(self.negative_prompt) <= 2000, "negative_prompt", "must be at most 2000 characters")
        if isinstance(self.maps, dict):
            object.__setattr__(self, "maps", MapConfig.from_dict(self.maps))


EXPORT_FORMATS = ("diffusers", "kohya", "full")
LORA_FORMATS = ("diffusers", "kohya")
EXPORT_DTYPE_NAMES = ("fp16", "fp32")
MAX_EXPORT_RANK = 65536


@dataclass(frozen=True)
class ExportOptions(_Serializable):
    """How sepen_core.export writes an adapter for other tools: `format` (EXPORT_FORMATS); for a LoRA, `rank` or
    `energy` (neither: full rank); the tensors' dtype."""

    format: str
    rank: int | None = None
    energy: float | None = None
    dtype: str = "fp16"

    def __post_init__(self):
        _check(self.format in EXPORT_FORMATS, "format", f"{self.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
        check_low_rank(self.rank, self.energy)
        for name in ("rank", "energy"):
            _check(
                self.format in LORA_FORMATS or getattr(self, name) is None,
                name,
                f"applies to the LoRA formats ({', '.join(LORA_FORMATS)}), not {self.format}",
            )
        _check(
            self.dtype in EXPORT_DTYPE_NAMES, "dtype", f"{self.dtype!r} is not one of {', '.join(EXPORT_DTYPE_NAMES)}"
        )

    @property
    def label(self) -> str:
        """A short name for files and ETags: 'kohya-r8', 'diffusers-e0.9', 'full'."""
        if self.rank is not None:
            return f"{self.format}-r{self.rank}"
        if self.energy is not None:
            return f"{self.format}-e{self.energy:g}"
        return self.format


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """given over defaults, with a nested `maps` dict merged key by key."""
    merged = {**defaults, **given}
    if "maps" in defaults or "maps" in given:
        merged["maps"] = {**defaults.get("maps", {}), **given.get("maps", {})}
    return merged


@dataclass(frozen=True)
class ModelDefaults(_Serializable):
    """What a base model recommends where a request is silent; saved in its model_index.json (`sepen_defaults`).

    The paper's settings suit Stable Diffusion; a small model trained from scratch (the bundled toy
    model) needs its own: no classifier-free guidance, maps at another resolution, a far larger
    learning rate. Precedence, lowest first: the paper's recipe, the model's defaults, the request.
    """

    sample: dict[str, Any] = field(default_factory=dict)  # SampleConfig fields
    maps: dict[str, Any] = field(default_factory=dict)  # MapConfig fields, for sampling and finetuning alike
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields, concept pairs or groups
    large_scale: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields, a concept collection

    def __post_init__(self):
        for name in ("sample", "finetune", "large_scale"):
            _check("maps" not in getattr(self, name), name, f"put map settings in 'maps', not in {name!r}")
        try:  # every default must make a valid config on its own
            self.sample_config()
            self.finetune_config("groups")
            self.finetune_config("collection")
        except ConfigError as exc:
            raise ConfigError(f"sepen_defaults.{exc.field}", exc.message) from exc

    def sample_config(self, given: dict[str, Any] | None = None) -> SampleConfig:
        return SampleConfig.from_dict(_merged({**self.sample, "maps": self.maps}, given or {}))

    def finetune_config(self, mode: str, given: dict[str, Any] | None = None) -> FinetuneConfig:
        """mode: ConceptSet.mode, "groups" (the paper's pair recipe) or "collection" (its large-scale recipe)."""
        recipe = FinetuneConfig.large_scale() if mode == "collection" else FinetuneConfig()
        model = self.large_scale if mode == "collection" else self.finetune
        base = {**recipe.to_dict(), **model}
        base["maps"] = {**base["maps"], **self.maps}
        return FinetuneConfig.from_dict(_merged(base, given or {}))
