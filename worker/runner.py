"""Run one job: claim its row, call sepen_core, store what it made, and record how it ended.

Every failure inside a job ends that job (failed, with a code and a message) and leaves the worker
serving; a job whose claim was taken over by another worker is dropped without writing.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from sepen_core.diagnostics import diagnose
from sepen_core.errors import AdapterError, Canceled, ConceptError, ConfigError, ModelLoadError, SepenError
from sepen_core.finetuning import StepReport, finetune
from sepen_core.prompts import ConceptSet, fill_template
from sepen_core.sampling import generate
from sepen_store.blobs import delete_blob, get_blob, put_blob
from sepen_store.errors import NotFound
from sepen_store.jobs import Claim, claim_job, finish_job, get_job
from sepen_store.registry import publish_version
from sepen_store.settings import Settings
from sepen_store.tables import AdapterVersion, Checkpoint, JobImage, utcnow
from worker.caches import AdapterCache, ModelCache
from worker.reporting import JobReporter

log = logging.getLogger(__name__)
LOSS_CURVE_POINTS = 200
PROBE_PROMPTS = 4


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def failure_of(exc: BaseException) -> JobFailure:
    """Map what went wrong to the error code a client sees."""
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, ConceptError):
        return JobFailure("concept_not_found", str(exc))
    if isinstance(exc, ConfigError):
        return JobFailure("invalid_request", str(exc))
    if isinstance(exc, AdapterError):
        return JobFailure("adapter_mismatch", str(exc))
    if isinstance(exc, ModelLoadError):
        return JobFailure("model_unavailable", str(exc))
    if isinstance(exc, NotFound):
        return JobFailure(f"{exc.kind.replace(' ', '_')}_not_found", str(exc))
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return JobFailure("out_of_memory", f"the worker ran out of memory: {exc}".strip())
    if isinstance(exc, SepenError):
        return JobFailure("invalid_request", str(exc))
    return JobFailure("internal_error", f"{type(exc).__name__}: {exc}")


@dataclass
class Runtime:
    """What a worker process keeps between jobs."""

    settings: Settings
    sessions: sessionmaker[Session]
    models: ModelCache
    adapters: AdapterCache
    worker_id: str = f"{socket.gethostname()}:{os.getpid()}"

    @classmethod
    def create(cls, settings: Settings, sessions: sessionmaker[Session]) -> Runtime:
        return cls(settings, sessions, ModelCache(settings), AdapterCache(settings.adapter_cache_size))

    def run(self, kind: str, job_id: str) -> str | None:
        """Claim and run a job; returns its final status, or None if it was not ours to run."""
        with self.sessions() as session:
            claim = claim_job(session, job_id, f"{self.worker_id}:{uuid.uuid4().hex[:6]}", self.settings.job_lease_s)
        if claim is None:
            log.info("job %s is not claimable (already taken or finished); message dropped", job_id)
            return None
        beat = max(0.5, min(10.0, self.settings.job_lease_s / 4))
        with JobReporter(self.sessions, claim, interval_s=self.settings.progress_interval_s, beat_s=beat) as reporter:
            status, result, failure = "succeeded", None, None
            try:
                if reporter.should_cancel():
                    raise Canceled(0)
                run = self._finetune if kind == "finetune" else self._generate
                result = run(claim, reporter)
            except Canceled:
                status = "canceled"
            except Exception as exc:  # noqa: BLE001 - any crash ends this job, not the worker
                failure = failure_of(exc)
                status = "failed"
                log.warning("job %s failed: %s", job_id, failure, exc_info=failure.code == "internal_error")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if reporter.lost:
                log.warning("job %s was taken over by another worker; dropping this attempt", job_id)
                return None
            with self.sessions() as session:
                finished = finish_job(session, claim, status, result=result,
                                      error_code=failure.code if failure else None,
                                      error_message=str(failure) if failure else None)
                if finished and kind == "finetune":
                    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
                    session.commit()
            return status if finished else None

    # -- finetune --------------------------------------------------------------------------------
    def _finetune(self, claim: Claim, reporter: JobReporter) -> dict:
        with self.sessions() as session:
            job = get_job(session, None, claim.job_id)
            existing = session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job.id))
            if existing is not None:  # an earlier attempt published and died before finishing
                return finetune_result(existing)
        request = job.request
        model = self.models.get(request["model"])
        concepts = ConceptSet.from_dict(request["concepts"])
        config = model.defaults.finetune_config(concepts.mode, request["recipe"])
        probes = probe_prompts(concepts)
        before = [diagnose(model, p, list(c), maps=config.maps, samples=8).to_dict() for p, c in probes]

        def on_step(report: StepReport) -> None:
            reporter.progress(step_progress(report), force=report.step == report.total_steps)

        with tempfile.TemporaryDirectory(prefix=f"sepen-{job.id[:8]}-") as directory:
            resumed_from = self._restore_checkpoint(job.id, Path(directory)) if claim.resumed else 0
            result = finetune(model, concepts, config, on_step=on_step, should_cancel=reporter.should_cancel,
                              checkpoint_dir=directory, checkpoint_every=self.settings.checkpoint_every,
                              on_checkpoint=lambda d, step: self._store_checkpoint(job.id, d, step),
                              adapter_metadata={"name": request["adapter"], "job_id": job.id, "tenant": job.tenant,
                                                "model": request["model"]})
        after = [diagnose(model, p, list(c), maps=config.maps, samples=8, adapter=result.adapter).to_dict() for p, c in probes]
        history = result.history
        stride = max(1, len(history) // LOSS_CURVE_POINTS)
        summary = {"loss_curve": [curve_point(r) for r in history[::stride]] + ([curve_point(history[-1])] if (len(history) - 1) % stride else []),
                   "final": step_progress(history[-1]), "resumed_from_step": resumed_from,
                   "diagnostics": [{"prompt": b["prompt"], "before": b, "after": a} for b, a in zip(before, after)]}
        adapter = result.adapter
        adapter.metadata["summary"] = summary
        data = adapter.to_bytes()
        with self.sessions() as session:
            version = publish_version(session, tenant=job.tenant, name=request["adapter"], job_id=job.id, data=data,
                                      base_model=request["model"], base_fingerprint=adapter.base_fingerprint,
                                      sha256=adapter.sha256, metadata=adapter.metadata)
            return finetune_result(version)

    def _store_checkpoint(self, job_id: str, directory: Path, step: int) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(directory.iterdir()):
                tar.add(path, arcname=path.name)
        with self.sessions() as session:
            blob = put_blob(session, buffer.getvalue(), "application/x-tar")
            old = session.get(Checkpoint, job_id)
            if old is None:
                session.add(Checkpoint(job_id=job_id, step=step, blob_id=blob.id, updated_at=utcnow()))
            else:
                old_blob, old.step, old.blob_id, old.updated_at = old.blob_id, step, blob.id, utcnow()
                session.flush()
                delete_blob(session, old_blob)
            session.commit()

    def _restore_checkpoint(self, job_id: str, directory: Path) -> int:
        with self.sessions() as session:
            row = session.get(Checkpoint, job_id)
            if row is None:
                return 0
            data = get_blob(session, row.blob_id).data
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(directory, filter="data")
        log.info("job %s resumes from its checkpoint at step %d", job_id, row.step)
        return row.step

    # -- generate --------------------------------------------------------------------------------
    def _generate(self, claim: Claim, reporter: JobReporter) -> dict:
        with self.sessions() as session:
            job = get_job(session, None, claim.job_id)
            adapter = self.adapters.get(session, job.adapter_version_id) if job.adapter_version_id else None
        request = job.request
        if request.get("adapter") and adapter is None:
            raise JobFailure("adapter_not_found", f"adapter {request['adapter']} was deleted before the job ran")
        model = self.models.get(request["model"])
        config = model.defaults.sample_config(request["sample"])
        concepts = request.get("concepts") or None
        result = generate(model, request["prompt"], config, adapter=adapter, concepts=concepts,
                          on_step=lambda i, n: reporter.progress({"step": i, "total": n}, force=i == n),
                          should_cancel=reporter.should_cancel)
        with self.sessions() as session:
            for old in session.scalars(select(JobImage).where(JobImage.job_id == job.id)):  # a retried attempt
                session.delete(old)
                session.flush()
                delete_blob(session, old.blob_id)
            images = []
            for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
                info = PngInfo()
                for key, value in {"prompt": request["prompt"], "seed": str(seed), "model": request["model"],
                                   "adapter": request.get("adapter") or "", "job": job.id,
                                   "steps": str(config.num_inference_steps), "guidance_scale": str(config.guidance_scale)}.items():
                    info.add_text(key, value)
                self._store_png(session, job.id, "image", i, image, info)
                entry = {"index": i, "seed": seed, "url": f"/jobs/{job.id}/images/{i}"}
                if result.scores is not None:
                    self._store_png(session, job.id, "heatmap", i, result.heatmap(i), info)
                    entry.update(heatmap_url=f"/jobs/{job.id}/heatmaps/{i}", scores=result.scores[i].to_dict())
                images.append(entry)
            session.commit()
        return {"images": images, "adapter": request.get("adapter"), "model": request["model"], "concepts": concepts or [],
                "sample": config.to_dict()}

    @staticmethod
    def _store_png(session: Session, job_id: str, kind: str, index: int, image, info: PngInfo) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        blob = put_blob(session, buffer.getvalue(), "image/png")
        session.add(JobImage(job_id=job_id, kind=kind, index=index, blob_id=blob.id))


def probe_prompts(concepts: ConceptSet) -> list[tuple[str, tuple[str, ...]]]:
    """A few prompts to diagnose before and after: the first groups, or seen and held-out pairs."""
    if concepts.groups:
        return [(fill_template(concepts.templates_for(len(g))[0], g), g) for g in concepts.groups[:PROBE_PROMPTS]]
    seen, held = concepts.training_concepts, concepts.held_out
    pairs = [(seen[0], seen[1])] + ([(held[0], held[1])] if len(held) >= 2 else []) + ([(seen[0], held[0])] if held else [])
    return [(fill_template(concepts.templates_for(2)[0], p), p) for p in pairs[:PROBE_PROMPTS]]


def step_progress(report: StepReport) -> dict:
    return {"step": report.step, "total": report.total_steps, "eta_s": round(report.eta, 1),
            "elapsed_s": round(report.elapsed, 1),
            "losses": {"total": report.loss, "separate": report.separate, "enhance": report.enhance, "prior": report.prior},
            "min_peak": report.min_peak, "overlap": report.overlap, "peaks": report.peaks}


def curve_point(report: StepReport) -> dict:
    return {"step": report.step, "loss": report.loss, "separate": report.separate, "enhance": report.enhance,
            "prior": report.prior, "min_peak": report.min_peak, "overlap": report.overlap}


def finetune_result(version: AdapterVersion) -> dict:
    name = version.meta.get("name")
    return {"adapter": f"{name}@{version.version}", "name": name, "version": version.version, "sha256": version.sha256,
            "weights_url": f"/adapters/{name}/{version.version}/weights", "summary": version.meta.get("summary")}
