"""What a claimed job does, the heavy part: finetune (load, probe, train, check, publish; each phase reported),
generate (load, sample in batches, store) and evaluate (load, sample base and adapter on the same seeds, score). It
runs inside the worker's job process (worker/engine.py) or, for tests, in the worker itself; it writes outputs through
the store, reports progress and reads the cancel flag through a JobControl, and never changes the job row's status
(worker/runner.py does).
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from pydantic import BaseModel as Contract
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.checkpoints import read_checkpoint_state
from sepen_core.config import FinetuneConfig
from sepen_core.diagnostics import diagnose
from sepen_core.errors import Canceled, SepenError
from sepen_core.evaluation import EvaluationConfig, EvaluationPrompt, evaluate_adapter, load_judge
from sepen_core.finetuning import Checkpoints, StepReport, finetune, run_fingerprint
from sepen_core.harm_check import HarmCheckConfig, check_adapter
from sepen_core.images import png_bytes
from sepen_core.model_card import model_card
from sepen_core.models import BaseModel
from sepen_core.prompts import ConceptSet, fill_template
from sepen_core.sampling import GenerationRequest, GenerationResult, batch_key, generate_batch
from sepen_store.availability import outage_of
from sepen_store.contract import (
    CurvePoint,
    EvaluateProgress,
    EvaluateResult,
    FinetuneProgress,
    FinetuneRequest,
    FinetuneResult,
    FinetuneSummary,
    GeneratedImage,
    GenerateProgress,
    GenerateRequest,
    GenerateResult,
    HarmCheck,
    JobRequest,
    Losses,
    ProbeDiagnosis,
    parse_request,
)
from sepen_store.errors import StorageRefused, StoreError
from sepen_store.job_outputs import (
    delete_checkpoint,
    load_checkpoint,
    quota_stopped_predecessor,
    replace_images,
    save_checkpoint,
)
from sepen_store.jobs import get_job
from sepen_store.registry import publish_version, version_of_job
from sepen_store.settings import WorkerSettings
from sepen_store.tables import AdapterVersion, Job
from worker.caches import AdapterCache, ModelCache
from worker.outages import WHAT_IS_DOWN, OutageTooLong, through_outages
from worker.phases import FinetunePhases, planned_steps
from worker.protocol import INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE

log = logging.getLogger(__name__)
T = TypeVar("T")
LOSS_CURVE_POINTS = 200
PROBE_PROMPTS = 4
PROBE_SAMPLES = 8


class JobControl(Protocol):
    """The running job's link to its row, as the work sees it (worker/reporting.JobReporter in process)."""

    def progress(self, progress: dict, *, force: bool = False) -> None: ...

    def should_cancel(self) -> bool: ...


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def failure_of(exc: BaseException) -> JobFailure:
    """What went wrong as a client sees it: the code each error class declares, with a message for the user. An
    outage or a bug gets a message of its own: the driver's or the exception's text (hosts, ports, buckets, paths)
    stays in the log, which carries the job's id."""
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, OutageTooLong):
        return JobFailure(exc.code, str(exc))
    dependency = outage_of(exc)
    if dependency is not None:
        return JobFailure(
            f"{dependency}_unavailable",
            f"the service's {WHAT_IS_DOWN[dependency]} did not answer; submit the job again",
        )
    if isinstance(exc, StorageRefused):  # its text names the endpoint and the bucket: for the log
        return JobFailure(
            exc.code,
            "the service's object store refused to store or read this job's data: its storage settings need fixing "
            "(the worker's log says what was refused); submitting again will not help until they are",
        )
    if isinstance(exc, (SepenError, StoreError)):
        return JobFailure(exc.code, str(exc))
    if isinstance(exc, ValidationError):
        return JobFailure("invalid_request", f"the job's stored request does not fit the job contract: {exc}")
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return JobFailure("out_of_memory", f"the worker ran out of memory: {exc}".strip())
    return JobFailure(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)


@dataclass
class Work:
    """The models, adapters and database sessions the work of jobs needs, kept between jobs."""

    settings: WorkerSettings
    sessions: sessionmaker[Session]
    models: ModelCache
    adapters: AdapterCache

    @classmethod
    def create(cls, settings: WorkerSettings, sessions: sessionmaker[Session]) -> Work:
        return cls(settings, sessions, ModelCache(settings), AdapterCache(settings.adapter_cache_size))

    def run(self, kind: str, job_id: str, resumed: bool, control: JobControl) -> Contract:
        """The job's typed result; raises what went wrong (see failure_of), or Canceled."""
        return getattr(self, kind)(job_id, resumed, control)

    def run_batch(self, kind: str, job_ids: list[str], controls: list[JobControl]) -> list[Contract | Exception]:
        """Several jobs of one kind at once (only generate jobs batch): per job its result or its error."""
        if kind != "generate":
            raise ValueError(f"{kind} jobs run one at a time")
        return self.generate_batch(job_ids, controls)

    def stored(self, step: Callable[[Session], T]) -> T:
        """Run a step on the database and the object store in a session of its own, riding out an outage of either for
        up to SEPEN_OUTAGE_GRACE_S (worker/outages.py)."""

        def attempt() -> T:
            with self.sessions() as session:
                return step(session)

        return through_outages(attempt, grace_s=self.settings.outage_grace_s)

    def _adapter_of(self, job: Job) -> KeyProjectionAdapter | None:
        """The job's adapter version (from the cache, or loaded once), or None without one or when it was deleted."""
        if not job.adapter_version_id:
            return None
        return self.stored(lambda session: self.adapters.get(session, job.adapter_version_id))

    def _load_request(self, job_id: str) -> tuple[Job, JobRequest]:
        job = self.stored(lambda session: get_job(session, None, job_id))
        return job, parse_request(job.kind, job.request)

    # -- finetune: load, probe, train, publish ---------------------------------------------------
    def finetune(self, job_id: str, resumed: bool, control: JobControl) -> FinetuneResult:
        job, request = self._load_request(job_id)
        published = self.stored(lambda session: version_of_job(session, job.id))
        if published is not None:  # an earlier attempt published and died before finishing the job
            return finetune_result(request.adapter, published)
        concepts = ConceptSet.from_dict(request.concepts)
        total = planned_steps(self.settings.models.get(request.model), concepts.mode, request.recipe)
        with FinetunePhases(control, total) as phases:  # loading, training, checking: worker/phases.py
            return self._finetune(job, request, concepts, resumed, control, phases)

    def _finetune(
        self,
        job: Job,
        request: FinetuneRequest,
        concepts: ConceptSet,
        resumed: bool,
        control: JobControl,
        phases: FinetunePhases,
    ) -> FinetuneResult:
        model = self.models.get(request.model)
        compiled = {"compile": True} if self.settings.compile else {}  # SEPEN_COMPILE: the worker's hardware
        config = model.defaults.finetune_config(concepts.mode, {**request.recipe, **compiled})
        probes = probe_prompts(concepts)
        before = probe(model, probes, config)
        with tempfile.TemporaryDirectory(prefix=f"sepen-{job.id[:8]}-") as directory:
            run = run_fingerprint(model, concepts, config)
            resumed_from, predecessor = self._restore_checkpoint(job, Path(directory), resumed, run)
            checkpoints = Checkpoints(
                directory,
                every=self.settings.checkpoint_every,
                on_write=lambda d, step: self._store_checkpoint(job.id, d, step),
            )
            result = finetune(
                model,
                concepts,
                config,
                should_cancel=control.should_cancel,
                checkpoint_dir=checkpoints,
                on_step=lambda report: phases.step(step_progress(report), force=report.step == report.total_steps),
                adapter_metadata={
                    "name": request.adapter,
                    "job_id": job.id,
                    "tenant": job.tenant,
                    "model": request.model,
                },
            )
        phases.checking(step_progress(result.history[-1]))
        after = probe(model, probes, config, result.adapter)
        summary = FinetuneSummary(
            loss_curve=loss_curve(result.history),
            final=step_progress(result.history[-1]),
            resumed_from_step=resumed_from,
            diagnostics=[
                ProbeDiagnosis(prompt=b["prompt"], before=b, after=a) for b, a in zip(before, after, strict=True)
            ],
            check=self._harm_check(request, model, result.adapter, concepts, config, control),
        )
        finished = self._publish(job, request, result.adapter, summary)
        if predecessor is not None:  # this job carried the stopped one's training to its end
            self._drop_predecessor_checkpoint(job.id, predecessor)
        return finished

    def _drop_predecessor_checkpoint(self, job_id: str, predecessor: str) -> None:
        """Delete the checkpoint this job resumed from, which the job that the compute quota stopped left; a failure
        is logged, never the job's (the adapter is published; retention deletes the checkpoint later)."""
        try:
            self.stored(lambda session: delete_checkpoint(session, predecessor))
        except Exception:  # noqa: BLE001
            log.warning(
                "job %s: could not delete the checkpoint of job %s, which it resumed from; retention will",
                job_id,
                predecessor,
                exc_info=True,
            )

    def _harm_check(
        self,
        request: FinetuneRequest,
        model: BaseModel,
        adapter: KeyProjectionAdapter,
        concepts: ConceptSet,
        config: FinetuneConfig,
        control: JobControl,
    ) -> HarmCheck | None:
        """The do-no-harm check of the new adapter (sepen_core.harm_check), with the model's judge if it has one; None
        when the recipe turns it off."""
        if not config.check_samples:
            return None
        card = model_card(self.settings.models[request.model])
        check = HarmCheckConfig(config.check_samples, model.defaults.sample_config())
        report = check_adapter(
            model,
            adapter,
            concepts,
            check,
            judge=load_judge(card.judge, card.path),
            should_cancel=control.should_cancel,
        )
        log.info("adapter %s: the do-no-harm check says %s", request.adapter, report["verdict"])
        return HarmCheck.model_validate(report)

    def _publish(
        self, job: Job, request: FinetuneRequest, adapter: KeyProjectionAdapter, summary: FinetuneSummary
    ) -> FinetuneResult:
        adapter.metadata["summary"] = summary.model_dump()
        # The finished weights wait in memory through an outage of the database or the object store (up to the grace).
        version = self.stored(
            lambda session: publish_version(
                session,
                tenant=job.tenant,
                name=request.adapter,
                job_id=job.id,
                data=adapter.to_bytes(),
                base_model=request.model,
                base_fingerprint=adapter.base_fingerprint,
                sha256=adapter.sha256,
                metadata=adapter.metadata,
            )
        )
        return finetune_result(request.adapter, version)

    def _store_checkpoint(self, job_id: str, directory: Path, step: int) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
        try:
            with self.sessions() as session:
                save_checkpoint(session, job_id, step, buffer.getvalue())
        except Exception as exc:
            if outage_of(exc) is None:
                raise
            # A checkpoint is insurance: train on through an outage, the next one may get through.
            log.warning("job %s: its checkpoint at step %d was not stored: %s", job_id, step, exc)

    def _restore_checkpoint(self, job: Job, directory: Path, resumed: bool, run: str) -> tuple[int, str | None]:
        """Lay the checkpoint to resume from in `directory`: the job's own (an earlier attempt's), else that of the same
        request stopped by the compute quota, if it was written by this run (`run`: its fingerprint; the model's
        defaults or weights may have changed since); one of another run is left alone and the job starts at step 0.
        Returns its step (0: none) and, for the latter, that job's id."""
        own = self.stored(lambda session: load_checkpoint(session, job.id)) if resumed else None
        predecessor = None if own else self.stored(lambda session: quota_stopped_predecessor(session, job))
        stored = own or (self.stored(lambda session: load_checkpoint(session, predecessor)) if predecessor else None)
        if stored is None:
            return 0, None
        step, data = stored
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(directory, filter="data")
        if not own and (read_checkpoint_state(directory) or {}).get("run") != run:
            log.warning(
                "job %s: the checkpoint of job %s (stopped by the compute quota, same request) belongs to another run "
                "(other model defaults or weights); starting from step 0",
                job.id,
                predecessor,
            )
            for path in directory.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            return 0, None
        origin = f"job {predecessor}'s checkpoint (stopped by the compute quota)" if predecessor else "its checkpoint"
        log.info("job %s resumes from %s at step %d", job.id, origin, step)
        return step, predecessor

    # -- generate: load, sample (several jobs as one batch), store -------------------------------
    def generate(self, job_id: str, resumed: bool, control: JobControl) -> GenerateResult:
        (outcome,) = self.generate_batch([job_id], [control])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(self, job_ids: list[str], controls: list[JobControl]) -> list[GenerateResult | Exception]:
        """Several generate jobs in as few UNet batches as their settings allow (sepen_core.sampling.batch_key),
        each with its own adapter: per job its result, or what went wrong with it (Canceled for a job canceled
        while its batch ran: the batch goes on for the others and stops only when all of them are canceled). A
        batch that fails runs again one job at a time, so that one job's error is that job's alone."""
        outcomes: list[GenerateResult | Exception | None] = [None] * len(job_ids)
        batches: dict[tuple, list[_Generation]] = {}
        for index, job_id in enumerate(job_ids):
            try:
                generation = self._prepare_generation(index, job_id)
            except Exception as exc:  # noqa: BLE001 - this job fails, the others run
                outcomes[index] = exc
                continue
            key = (generation.request.model, batch_key(generation.model, generation.sampling))
            batches.setdefault(key, []).append(generation)
        for members in batches.values():
            self._generate_together(members, controls, outcomes)
        return outcomes

    def _prepare_generation(self, index: int, job_id: str) -> _Generation:
        job, request = self._load_request(job_id)
        adapter = self._adapter_of(job)
        if request.adapter and adapter is None:
            raise JobFailure("adapter_not_found", f"adapter {request.adapter} was deleted before the job ran")
        model = self.models.get(request.model)
        config = model.defaults.sample_config(request.sample)
        return _Generation(
            index, job, request, model, GenerationRequest(request.prompt, config, adapter, tuple(request.concepts))
        )

    def _generate_together(self, members: list[_Generation], controls: list[JobControl], outcomes: list) -> None:
        live = [controls[m.index] for m in members]

        def on_step(i: int, n: int) -> None:
            for control in live:
                control.progress(GenerateProgress(step=i, total=n).model_dump(), force=i == n)

        try:
            results = generate_batch(
                members[0].model,
                [m.sampling for m in members],
                on_step=on_step,
                should_cancel=lambda: all(control.should_cancel() for control in live),
            )
        except Canceled as exc:  # every job of the batch was canceled
            for m in members:
                outcomes[m.index] = exc
            return
        except Exception as exc:  # noqa: BLE001 - one job's bad input, or a batch too big for the device
            if len(members) == 1:
                outcomes[members[0].index] = exc
                return
            log.warning("a batch of %d generate jobs failed (%s); running them one by one", len(members), exc)
            for m in members:
                self._generate_together([m], controls, outcomes)
            return
        for m, result in zip(members, results, strict=True):
            if controls[m.index].should_cancel():
                outcomes[m.index] = Canceled(m.sampling.config.num_inference_steps)
                continue
            try:
                outcomes[m.index] = self._store_images(m.job, m.request, result)
            except Exception as exc:  # noqa: BLE001 - this job fails, the others keep their images
                outcomes[m.index] = exc

    def _store_images(self, job: Job, request: GenerateRequest, result: GenerationResult) -> GenerateResult:
        pngs, images = [], []
        for i, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            metadata = result.image_metadata(i, model=request.model, adapter=request.adapter, job=job.id)
            pngs.append(("image", i, png_bytes(image, metadata)))
            if result.scores is not None:
                pngs.append(("heatmap", i, png_bytes(result.heatmap(i), metadata)))
            images.append(
                GeneratedImage(
                    index=i,
                    seed=seed,
                    heatmap=result.scores is not None,
                    scores=result.scores[i].to_dict() if result.scores is not None else None,
                )
            )
        self.stored(lambda session: replace_images(session, job.id, pngs))
        return GenerateResult(
            images=images,
            adapter=request.adapter,
            model=request.model,
            concepts=request.concepts,
            sample=result.config.to_dict(),
        )

    # -- evaluate: load, sample both sides on the same seeds, score ------------------------------
    def evaluate(self, job_id: str, resumed: bool, control: JobControl) -> EvaluateResult:
        job, request = self._load_request(job_id)
        adapter = self._adapter_of(job)
        if adapter is None:
            raise JobFailure("adapter_not_found", f"adapter {request.adapter} was deleted before the job ran")
        model = self.models.get(request.model)
        card = model_card(self.settings.models[request.model])
        judge = load_judge(card.judge, card.path)
        prompts = [EvaluationPrompt(p.prompt, tuple(p.concepts)) for p in request.prompts]
        if not prompts:
            if judge is None:
                raise JobFailure("invalid_request", f"model {request.model} has no prompts of its own: give prompts")
            prompts = judge.default_prompts()
        config = EvaluationConfig(request.samples, request.seed, model.defaults.sample_config(request.sample))

        def on_prompt(done: int, total: int) -> None:
            control.progress(EvaluateProgress(step=done, total=total).model_dump(), force=done in (0, total))

        on_prompt(0, len(prompts))
        report = evaluate_adapter(
            model, adapter, prompts, config, judge=judge, on_prompt=on_prompt, should_cancel=control.should_cancel
        )
        return EvaluateResult(adapter=request.adapter, model=request.model, **report)


@dataclass
class _Generation:
    """A generate job ready to sample: its place among the batch's jobs, its row and request, its model, and what
    sepen_core samples for it."""

    index: int
    job: Job
    request: GenerateRequest
    model: BaseModel
    sampling: GenerationRequest


def probe_prompts(concepts: ConceptSet) -> list[tuple[str, tuple[str, ...]]]:
    """A few prompts to diagnose before and after: the first groups, or seen and held-out pairs."""
    if concepts.groups:
        return [(fill_template(concepts.templates_for(len(g))[0], g), g) for g in concepts.groups[:PROBE_PROMPTS]]
    seen, held = concepts.training_concepts, concepts.held_out
    pairs = (
        [(seen[0], seen[1])] + ([(held[0], held[1])] if len(held) >= 2 else []) + ([(seen[0], held[0])] if held else [])
    )
    return [(fill_template(concepts.templates_for(2)[0], p), p) for p in pairs[:PROBE_PROMPTS]]


def probe(
    model: BaseModel,
    probes: list[tuple[str, tuple[str, ...]]],
    config: FinetuneConfig,
    adapter: KeyProjectionAdapter | None = None,
) -> list[dict]:
    """The attention diagnostics of each probe prompt, with the base keys or with `adapter`."""
    return [
        diagnose(model, prompt, list(concepts), maps=config.maps, samples=PROBE_SAMPLES, adapter=adapter).to_dict()
        for prompt, concepts in probes
    ]


def step_progress(report: StepReport) -> FinetuneProgress:
    return FinetuneProgress(
        step=report.step,
        total=report.total_steps,
        eta_s=round(report.eta, 1),
        elapsed_s=round(report.elapsed, 1),
        losses=Losses(total=report.loss, separate=report.separate, enhance=report.enhance, prior=report.prior),
        min_peak=report.min_peak,
        overlap=report.overlap,
        peaks=report.peaks,
    )


def loss_curve(history: list[StepReport]) -> list[CurvePoint]:
    """At most about LOSS_CURVE_POINTS evenly spaced steps, always ending with the last one."""
    stride = max(1, len(history) // LOSS_CURVE_POINTS)
    kept = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
    return [
        CurvePoint(
            step=r.step,
            loss=r.loss,
            separate=r.separate,
            enhance=r.enhance,
            prior=r.prior,
            min_peak=r.min_peak,
            overlap=r.overlap,
        )
        for r in kept
    ]


def finetune_result(name: str, version: AdapterVersion) -> FinetuneResult:
    summary = version.meta.get("summary")
    return FinetuneResult(
        adapter=f"{name}@{version.version}",
        name=name,
        version=version.version,
        sha256=version.sha256,
        summary=FinetuneSummary.model_validate(summary) if summary else None,
    )
