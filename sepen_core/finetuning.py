"""SepEn finetuning: train only the UNet's `attn2.to_k` weights with AdamW on data-free batches,
with progress callbacks, cooperative cancellation, checkpoints and exact resume.

Every step draws its prompts and noise from a seed derived from (config.seed, step), and a
checkpoint holds the key weights and AdamW moments, so a resumed run ends bitwise where an
uninterrupted one would. The model's base keys are restored on return: the result is the adapter.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sepen_core.adapters import KeyProjectionAdapter, restore_base_keys
from sepen_core.attention import CrossAttentionProcessor, cross_attention_layers, installed_processors
from sepen_core.checkpoints import read_checkpoint_state, restore_checkpoint, write_checkpoint
from sepen_core.config import FinetuneConfig
from sepen_core.errors import Canceled, CheckpointError
from sepen_core.models import BaseModel
from sepen_core.objective import (
    StepOutput,
    TrainingBatch,
    check_concepts,
    generated_pool,
    make_training_batch,
    sepen_objective,
)
from sepen_core.prompts import ConceptSet
from sepen_core.scores import mean_scores, object_scores


@dataclass
class StepReport:
    """What one optimisation step measured; `peaks` maps each concept seen in the batch to its mean
    smoothed peak activation, `min_peak` is the weakest object's mean, `overlap` the mean soft IoU."""

    step: int  # 1-based: steps completed
    total_steps: int
    loss: float
    separate: float
    enhance: float
    prior: float | None
    peaks: dict[str, float]
    min_peak: float
    overlap: float
    elapsed: float  # seconds since this run (or its resume) started
    eta: float  # seconds left at this run's pace

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneResult:
    adapter: KeyProjectionAdapter
    history: list[StepReport] = field(default_factory=list)
    resumed_from_step: int = 0


@dataclass(frozen=True)
class Checkpoints:
    """Where a finetune keeps its checkpoint, how often it writes one, and whom it tells after each write:
    on_write(directory, step) (the service copies it to its database)."""

    directory: Path
    every: int = 50
    on_write: Callable[[Path, int], None] | None = None

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory))

    def due(self, done: int, total: int) -> bool:
        """Whether to write after `done` of `total` steps (the finished run's adapter replaces the last one)."""
        return self.every > 0 and done % self.every == 0 and done < total

    def write(self, done: int, params: dict, optimizer: torch.optim.AdamW, state: dict) -> None:
        write_checkpoint(self.directory, done, params, optimizer, state)
        if self.on_write is not None:
            self.on_write(self.directory, done)


def run_fingerprint(model: BaseModel, concepts: ConceptSet, config: FinetuneConfig) -> str:
    """Identifies a run: a checkpoint resumes only the run that wrote it."""
    recipe = config.to_dict()
    if config.latents == "pseudo":  # runs from before the latents option existed keep their fingerprint
        del recipe["latents"], recipe["latent_pool"]
    # How the adapter is stored and checked, not what is trained; newer than checkpoints.
    del recipe["rank"], recipe["energy"], recipe["check_samples"]
    for name in ("trajectory_window", "teacher_weight"):  # newer options: at their defaults, older runs' fingerprints
        if getattr(config, name) == getattr(FinetuneConfig, name):
            del recipe[name]
    blob = json.dumps(
        {"config": recipe, "concepts": concepts.to_dict(), "base": model.base_fingerprint}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _trained_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    params = dict(model.unet.named_parameters())
    return {name: params[name] for name in model.base_keys}


@contextmanager
def _keys_in_fp32(model: BaseModel):
    """In a half-precision model (fp16, bf16), the key projections train as fp32 copies while every frozen weight
    stays as it is (AdamW's small updates vanish in bf16 weights, and autocast over fp32 weights would keep bf16
    copies of the whole UNet for the backward); every cross-attention layer computes its keys in fp32 and hands
    them on in the model's dtype. The model's own key weights are back in place on exit."""
    if model.dtype == torch.float32:
        yield
        return
    layers = cross_attention_layers(model.unet)
    modules = {name: model.unet.get_submodule(name).to_k for name in layers}
    originals = {name: linear.weight for name, linear in modules.items()}
    for linear in modules.values():
        linear.weight = torch.nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    fp32_keys = {name: CrossAttentionProcessor() for name in layers}
    try:
        with installed_processors(model.unet, fp32_keys):
            yield
    finally:
        for name, linear in modules.items():
            linear.weight = originals[name]


def _load_checkpoint(
    directory: Path, fingerprint: str, params: dict, optimizer: torch.optim.AdamW
) -> tuple[int, list[StepReport]]:
    state = read_checkpoint_state(directory)
    if state is None:
        return 0, []
    if state.get("run") != fingerprint:
        raise CheckpointError(
            f"checkpoint in {str(directory)!r} belongs to another run (other config, concepts or base model)"
        )
    restore_checkpoint(directory, state, params, optimizer)
    return int(state["step"]), [StepReport(**r) for r in state["history"]]


def _step_report(
    done: int, config: FinetuneConfig, batch: TrainingBatch, out: StepOutput, elapsed: float, eta: float
) -> StepReport:
    """What a step measured: its losses and its batch's map scores (overlap: the mean over samples)."""
    scores = object_scores(out.maps, [p.concepts for p in batch.prompts], config.maps.smoothing_sigma)
    batch_scores = mean_scores(scores)
    loss = out.loss
    return StepReport(
        done,
        config.steps,
        loss.total.item(),
        loss.separate.item(),
        loss.enhance.item(),
        None if loss.prior is None else loss.prior.item(),
        batch_scores.peaks,
        batch_scores.min_peak,
        statistics.fmean(s.overlap for s in scores),
        elapsed,
        eta,
    )


def finetune(
    model: BaseModel,
    concepts: ConceptSet,
    config: FinetuneConfig | None = None,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_dir: str | Path | Checkpoints | None = None,
    autocast_dtype: torch.dtype | None = None,
    adapter_metadata: dict | None = None,
) -> FinetuneResult:
    """Finetune the key projections of `model` on `concepts` and return the adapter.

    on_step(report) is called after every step; should_cancel() is polled before every step and
    raises Canceled when it returns True. With checkpoint_dir, a directory (a checkpoint every 50
    steps) or Checkpoints (how often, and whom to tell of each write), checkpoints are written and
    an existing one of the same run is resumed from. In a half-precision model the keys train in fp32
    (_keys_in_fp32).
    """
    with _keys_in_fp32(model):
        return _finetune(
            model,
            concepts,
            config,
            on_step=on_step,
            should_cancel=should_cancel,
            checkpoint_dir=checkpoint_dir,
            autocast_dtype=autocast_dtype,
            adapter_metadata=adapter_metadata,
        )


def _finetune(
    model: BaseModel,
    concepts: ConceptSet,
    config: FinetuneConfig | None,
    *,
    on_step: Callable[[StepReport], None] | None,
    should_cancel: Callable[[], bool] | None,
    checkpoint_dir: str | Path | Checkpoints | None,
    autocast_dtype: torch.dtype | None,
    adapter_metadata: dict | None,
) -> FinetuneResult:
    config = config or model.defaults.finetune_config(concepts.mode)
    check_concepts(model, concepts)
    params = _trained_parameters(model)
    fingerprint = run_fingerprint(model, concepts, config)
    optimizer = torch.optim.AdamW(
        params.values(),
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    checkpoints = Checkpoints(checkpoint_dir) if isinstance(checkpoint_dir, (str, Path)) else checkpoint_dir
    autocast = torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        start, history = (0, [])
        # Made with the base keys, before a checkpoint's weights are restored.
        pool = generated_pool(model, concepts, config, should_cancel) if config.latents != "pseudo" else None
        if checkpoints is not None:
            start, history = _load_checkpoint(checkpoints.directory, fingerprint, params, optimizer)
        for p in params.values():
            p.requires_grad_(True)
        began = time.perf_counter()
        for step in range(start, config.steps):
            if should_cancel is not None and should_cancel():
                raise Canceled(step)
            batch = make_training_batch(model, concepts, config, step, pool)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                out = sepen_objective(model, batch, config)
            out.loss.total.backward()
            torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], config.max_grad_norm)
            optimizer.step()

            elapsed = time.perf_counter() - began
            eta = elapsed / (step + 1 - start) * (config.steps - step - 1)  # at this run's pace
            report = _step_report(step + 1, config, batch, out, elapsed, eta)
            history.append(report)
            if on_step is not None:
                on_step(report)
            if checkpoints is not None and checkpoints.due(step + 1, config.steps):
                state = {"run": fingerprint, "history": [r.to_dict() for r in history]}
                checkpoints.write(step + 1, params, optimizer, state)

        metadata = {
            "concepts": concepts.to_dict(),
            "recipe": config.to_dict(),
            "steps": config.steps,
            "seed": config.seed,
            **(adapter_metadata or {}),
        }
        adapter = KeyProjectionAdapter.from_model(model, metadata)
        if config.rank is not None or config.energy is not None:
            # Storage only (the full-rank keys were trained); the SVD runs where the model is: fast on a GPU.
            adapter = adapter.low_rank(config.rank, config.energy, device=model.device)
        return FinetuneResult(adapter, history, start)
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        restore_base_keys(model)
