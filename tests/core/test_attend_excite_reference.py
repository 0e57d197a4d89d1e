"""sepen's Attend-and-Excite computes, step by step, what diffusers' reference pipeline computes (docs/method.md)."""

from dataclasses import dataclass, field

import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
    GaussianSmoothing,
)

from sepen_core import sampling
from sepen_core.attend_excite import REFERENCE_SMOOTHING_SIGMA, AttendExcite, AttendExciteConfig
from sepen_core.attention import map_targets
from sepen_core.config import SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.losses import gaussian_kernel
from sepen_core.models import build_tiny_model

PROMPT = "a cat and a dog"
CONCEPTS = ["cat", "dog"]
TOKEN_INDICES = [2, 5]  # "cat" and "dog" after the start token
STEPS, GUIDANCE = 50, 6.0  # the published settings: A&E alters steps 0-24 and refines at steps 0, 10 and 20
SIDE = 16  # latents 16x16 (32 px): maps 4x4 at sepen's map_downsample 4, the reference's attn_res
RTOL = 1e-4


@dataclass
class StepRecord:
    """What one A&E implementation computed at one denoising step."""

    peaks: list[torch.Tensor] = field(default_factory=list)  # (K,) smoothed peaks, one per A&E forward
    losses: list[float] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)  # step size of each latent update
    latents: list[torch.Tensor] = field(default_factory=list)  # the latents after each update
    refinement_updates: int | None = None  # None: no refinement ran


class RecordingPipeline(StableDiffusionAttendAndExcitePipeline):
    """The reference pipeline, its own code unchanged, with its A&E calls recorded per denoising step."""

    @classmethod
    def of(cls, model) -> "RecordingPipeline":
        """The reference on a sepen model's components."""
        pipe = cls.from_pipe(model.diffusers_pipeline())  # on a copy of the UNet: its processors stay there
        pipe.set_progress_bar_config(disable=True)
        pipe.records = [StepRecord()]
        return pipe

    def next_step(self, step: int, t, latents) -> None:
        """The pipeline's callback, after each denoising step."""
        self.records.append(StepRecord())

    def _compute_max_attention_per_index(self, attention_maps, indices):
        peaks = super()._compute_max_attention_per_index(attention_maps, indices)
        self.records[-1].peaks.append(torch.stack(peaks).detach())
        return peaks

    def _compute_loss(self, max_attention_per_index):
        loss = super()._compute_loss(max_attention_per_index)
        self.records[-1].losses.append(float(loss))
        return loss

    def _update_latent(self, latents, loss, step_size):
        latents = super()._update_latent(latents, loss, step_size)
        self.records[-1].sizes.append(float(step_size))
        self.records[-1].latents.append(latents.detach().clone())
        return latents

    def _perform_iterative_refinement_step(self, *args, **kwargs):
        before = len(self.records[-1].sizes)
        out = super()._perform_iterative_refinement_step(*args, **kwargs)
        self.records[-1].refinement_updates = len(self.records[-1].sizes) - before
        return out

    def run(self, latents: torch.Tensor, steps: int = STEPS, **kwargs) -> torch.Tensor:
        """The final latents from these initial latents, A&E on the prompt's two objects."""
        return self(
            PROMPT,
            token_indices=TOKEN_INDICES,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            attn_res=(SIDE // 4, SIDE // 4),
            output_type="latent",
            callback=self.next_step,
            **kwargs,
        ).images


class RecordingExcite(AttendExcite):
    """sepen's A&E with the same quantities recorded per denoising step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: dict[int, StepRecord] = {}
        self.current = StepRecord()

    def update(self, latents, i, t):
        self.current = self.records.setdefault(i, StepRecord())
        before = self.updates
        latents = super().update(latents, i, t)
        refinement_updates = self.updates - before - 1
        if refinement_updates > 0:
            self.current.refinement_updates = refinement_updates
        return latents

    def peaks(self, latents, t, rows=None):
        peaks = super().peaks(latents, t, rows)
        self.current.peaks.append(peaks[0].detach())
        return peaks

    def _loss_gradient(self, latents, t, rows=None):
        losses, grad = super()._loss_gradient(latents, t, rows)
        self.current.losses.append(float(losses[0]))
        return losses, grad

    def _step(self, latents, grad, size, rows):
        latents = super()._step(latents, grad, size, rows)
        if rows[0]:
            self.current.sizes.append(size)
            self.current.latents.append(latents.clone())
        return latents


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0, sample_size=SIDE)


@pytest.fixture(scope="module")
def initial_latents(model):
    return sampling._initial_noise(model, [0], (SIDE, SIDE))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    difference = float((ours - theirs).abs().max())
    assert difference <= RTOL * float(theirs.abs().max()), f"{what}: differs by {difference:.3g}"


def assert_same_step(ours: StepRecord, theirs: StepRecord, step: int) -> None:
    """Equal peaks, losses, refinement, step sizes and updated latents at one step. The reference runs its first
    refinement iteration on the latents it has just measured: that repeated forward is dropped (cost, not result)."""
    peaks, losses = theirs.peaks, theirs.losses
    if theirs.refinement_updates is not None:
        assert_close(peaks[1], peaks[0], f"step {step}: the reference's repeated forward")
        peaks, losses = peaks[:1] + peaks[2:], losses[:1] + losses[2:]
    assert ours.refinement_updates == theirs.refinement_updates, f"step {step}: refinement updates"
    assert len(ours.peaks) == len(peaks) and len(ours.sizes) == len(theirs.sizes), f"step {step}: A&E calls"
    for k, (a, b) in enumerate(zip(ours.peaks, peaks, strict=True)):
        assert_close(a, b, f"step {step}, forward {k}: peaks")
    assert ours.losses == pytest.approx(losses, rel=RTOL), f"step {step}: losses"
    assert ours.sizes == pytest.approx(theirs.sizes, rel=1e-12), f"step {step}: step sizes"
    for k, (a, b) in enumerate(zip(ours.latents, theirs.latents, strict=True)):
        assert_close(a, b, f"step {step}, update {k}: latents")


def test_attend_and_excite_matches_diffusers_reference_step_by_step(model, initial_latents, monkeypatch):
    reference = RecordingPipeline.of(model)
    theirs = reference.run(initial_latents)

    made: list[RecordingExcite] = []
    monkeypatch.setattr(sampling, "AttendExcite", lambda *a, **k: made.append(RecordingExcite(*a, **k)) or made[-1])
    config = SampleConfig(num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=0)
    ours = sampling.generate(model, PROMPT, config, concepts=CONCEPTS, attend_excite=AttendExciteConfig())
    (excite,) = made

    altered = range(STEPS // 2)
    for step in altered:
        assert_same_step(excite.records[step], reference.records[step], step)
    # The reference refines at steps 0, 10 and 20 (the random model never reaches the thresholds: 20 updates each).
    assert [s for s in altered if reference.records[s].refinement_updates] == [0, 10, 20]
    assert sum(len(r.sizes) for r in excite.records.values()) == excite.updates == 25 + 3 * 20
    # Past step 24 the reference still runs A&E's forward (its cost, no update); sepen skips it.
    assert all(len(reference.records[s].peaks) == 1 and not reference.records[s].sizes for s in range(25, STEPS))
    assert all(not excite.records[s].peaks for s in range(25, STEPS))

    assert_close(ours.latents, theirs, "final latents")
    plain = sampling.generate(model, PROMPT, config)
    assert float((plain.latents - theirs).abs().max()) > 100 * RTOL * float(theirs.abs().max())  # A&E matters


class Stop(Exception):
    """Ends the reference pipeline after its first denoising step."""


def first_step_of_reference(model, latents, threshold: float) -> StepRecord:
    """The reference's step 0 with this refinement threshold (its other steps are not run)."""
    reference = RecordingPipeline.of(model)

    def stop(step, t, latents):
        raise Stop

    reference.next_step = stop
    try:
        reference.run(latents, thresholds={0: threshold})
    except Stop:  # the pipeline leaves its processors on its own copy of the UNet
        pass
    return reference.records[0]


def test_refinement_stops_where_the_reference_stops(model, initial_latents):
    """The reference decides on another refinement iteration by the loss before its last update, so it updates once
    more after the weakest peak has passed the threshold: sepen does the same."""
    trajectory = first_step_of_reference(model, initial_latents, threshold=1.0)  # 20 updates, none passes
    weakest = [float(p.min()) for p in trajectory.peaks[1:]]  # at the latents before each update, then after
    assert trajectory.refinement_updates == 20 and weakest[5] < weakest[10]
    threshold = (weakest[5] + weakest[6]) / 2
    passed = next(i for i, w in enumerate(weakest) if w >= threshold)  # the first latents that pass

    theirs = first_step_of_reference(model, initial_latents, threshold)
    assert theirs.refinement_updates == passed + 1  # one update after passing

    model.scheduler.set_timesteps(STEPS)
    cond = model.encode_prompts([PROMPT])
    targets = map_targets(model, cond, [CONCEPTS], map_downsample=4, latent_size=(SIDE, SIDE))
    config, t = AttendExciteConfig(refinement={0.0: threshold}), model.scheduler.timesteps[0]
    excite = RecordingExcite(config, model.unet, cond, targets, STEPS)
    alone = excite.update(initial_latents, 0, t)
    assert_same_step(excite.records[0], theirs, 0)

    # In a batch, each image refines as long as it does alone (the reference loops over images).
    other = sampling._initial_noise(model, [1], (SIDE, SIDE))
    batch = AttendExcite(config, model.unet, cond.select([0, 0]), targets.select([0, 0]), STEPS)
    together = batch.update(torch.cat([initial_latents, other]), 0, t)
    assert_close(together[:1], alone, "an image refined in a batch")
    separately = AttendExcite(config, model.unet, cond, targets, STEPS)
    assert_close(together[1:], separately.update(other, 0, t), "the other image")
    assert batch.updates == max(excite.updates, separately.updates) != min(excite.updates, separately.updates)


def test_smoothing_is_the_reference_kernel():
    """The reference's kernel exp(-((x - mean) / (2 * sigma))**2) is a Gaussian of sigma 0.5 * sqrt(2)."""
    assert torch.allclose(gaussian_kernel(REFERENCE_SMOOTHING_SIGMA), GaussianSmoothing().weight[0, 0], atol=1e-7)
    assert not torch.allclose(gaussian_kernel(0.5), GaussianSmoothing().weight[0, 0], atol=1e-2)  # SepEn's own


def test_token_softmax_over_the_prompt_tokens_is_an_option(model, initial_latents):
    cond = model.encode_prompts([PROMPT])
    targets = map_targets(model, cond, [CONCEPTS], map_downsample=4, latent_size=(SIDE, SIDE))
    t = torch.tensor(900)
    with torch.no_grad():
        peaks = {
            tokens: AttendExcite(AttendExciteConfig(token_softmax=tokens), model.unet, cond, targets, STEPS).peaks(
                initial_latents, t
            )
            for tokens in ("all", "prompt")
        }
    # Over 5 prompt tokens instead of 75, each object keeps a larger share.
    assert (peaks["prompt"] > 2 * peaks["all"]).all()
    with pytest.raises(ConfigError, match="token_softmax"):
        AttendExciteConfig(token_softmax="content")
