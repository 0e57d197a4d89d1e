"""Mixed-adapter batches in the worker (in-process, embedded database): running one generate job claims the queued
jobs that can share its UNet batch, each with its own adapter, and each gets the images it gets when run alone;
jobs with other settings, jobs past the image limit and canceled jobs stay out; a bad job fails alone; an
Attend-and-Excite job runs alone."""

import io

import numpy as np
import pytest
from PIL import Image

from sepen_core.errors import Canceled
from sepen_core.models import build_tiny_model
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.job_outputs import get_image
from sepen_store.jobs import create_job, get_job, request_cancel
from sepen_store.settings import WorkerSettings
from tests.interop import publish_adapter, spectral_adapter
from worker.runner import Runtime

STEPS = 3


def make_runtime(path, **settings):
    settings = WorkerSettings(data_dir=path, progress_interval_s=0.0, **settings)
    upgrade_database(settings.database_url)
    return Runtime.create(settings, session_factory(make_engine(settings.database_url)), in_process=True)


def publish(runtime, name: str, seed: int) -> str:
    adapter = spectral_adapter(build_tiny_model(seed=0), seed=seed, top=2.0)
    with runtime.sessions() as session:
        return publish_adapter(session, adapter, name).id


def submit(runtime, versions: dict[str, str], adapter: str | None, *, prompt="a cat and a dog", concepts=(), **sample):
    request = {
        "prompt": prompt,
        "model": "sepen-tiny",
        "adapter": f"{adapter}@1" if adapter else None,
        "concepts": list(concepts),
        "sample": {"num_inference_steps": STEPS, "num_images": 1, "seed": 0, **sample},
    }
    with runtime.sessions() as session:
        version = versions[adapter] if adapter else None
        return create_job(session, "acme", "generate", request, adapter_version_id=version)[0].id


def row(runtime, job_id):
    with runtime.sessions() as session:
        return get_job(session, None, job_id)


def pixels(runtime, job_id, index=0) -> np.ndarray:
    with runtime.sessions() as session:
        return np.asarray(Image.open(io.BytesIO(get_image(session, job_id, "image", index).data)), dtype=np.int16)


# Jobs that can share a batch: different adapters, prompts, seeds, image counts, guidance scales, negative prompts.
COMPATIBLE = [
    ("red", {"num_images": 2, "seed": 0}),
    ("blue", {"seed": 5}),
    (None, {"seed": 9, "negative_prompt": "blurry"}),
    ("red", {"seed": 3, "guidance_scale": 3.0}),
]


@pytest.fixture
def setups(tmp_path):
    """A batching runtime and a one-at-a-time one, each with the same two adapters published."""
    made = {}
    for name, batch_jobs in (("batched", 8), ("alone", 1)):
        runtime = make_runtime(tmp_path / name, generate_batch_jobs=batch_jobs)
        made[name] = (runtime, {"red": publish(runtime, "red", 1), "blue": publish(runtime, "blue", 2)})
    return made


def test_jobs_with_different_adapters_share_a_batch_and_get_their_own_images(setups):
    runtime, versions = setups["batched"]
    jobs = [submit(runtime, versions, adapter, **sample) for adapter, sample in COMPATIBLE]
    other_steps = submit(runtime, versions, "red", num_inference_steps=STEPS + 1)
    assert runtime.run("generate", jobs[0]) == "succeeded"
    rows = [row(runtime, j) for j in jobs]
    assert [r.status for r in rows] == ["succeeded"] * len(jobs)
    assert len({r.worker for r in rows}) == 1  # one claim token: one batch
    assert row(runtime, other_steps).status == "queued"  # other settings: not in this batch
    assert all(runtime.run("generate", j) is None for j in jobs[1:])  # their messages arrive later: dropped
    assert runtime.run("generate", other_steps) == "succeeded"

    alone, alone_versions = setups["alone"]
    singles = [submit(alone, alone_versions, adapter, **sample) for adapter, sample in COMPATIBLE]
    for job_id in singles:
        assert alone.run("generate", job_id) == "succeeded"
    assert len({row(alone, j).worker for j in singles}) == len(singles)
    for (_, sample), batched, single in zip(COMPATIBLE, jobs, singles, strict=True):
        assert row(runtime, batched).result["sample"] == row(alone, single).result["sample"]
        for index in range(sample.get("num_images", 1)):
            assert np.abs(pixels(runtime, batched, index) - pixels(alone, single, index)).max() <= 1
    # The adapters make a difference, so the comparison above can fail.
    assert np.abs(pixels(runtime, jobs[0]) - pixels(runtime, jobs[2], 0)).max() > 10


def test_image_limit_and_canceled_jobs_keep_jobs_out_of_a_batch(tmp_path):
    runtime = make_runtime(tmp_path, generate_batch_jobs=8, generate_batch_images=3)
    versions = {"red": publish(runtime, "red", 1)}
    first = submit(runtime, versions, "red", num_images=2)
    canceled = submit(runtime, versions, None)
    with runtime.sessions() as session:
        request_cancel(session, "acme", canceled)
    fits = submit(runtime, versions, None, seed=4)
    too_many = submit(runtime, versions, "red", seed=6)
    assert runtime.run("generate", first) == "succeeded"
    assert row(runtime, fits).status == "succeeded" and row(runtime, fits).worker == row(runtime, first).worker
    assert row(runtime, too_many).status == "queued" and row(runtime, canceled).status == "canceled"


def test_a_bad_job_fails_alone_and_its_batch_succeeds(tmp_path):
    runtime = make_runtime(tmp_path, generate_batch_jobs=8)
    versions = {"red": publish(runtime, "red", 1)}
    good = submit(runtime, versions, "red", concepts=("cat", "dog"))
    bad = submit(runtime, versions, None, prompt="a cat and a bird", concepts=("cat", "dog"))
    also_good = submit(runtime, versions, None, prompt="a dog and a cat", concepts=("cat", "dog"), seed=2)
    assert runtime.run("generate", good) == "succeeded"
    assert row(runtime, bad).status == "failed" and row(runtime, bad).error_code == "concept_not_found"
    assert row(runtime, also_good).status == "succeeded"
    assert row(runtime, also_good).result["images"][0]["heatmap"] is True


class Control:
    """A job's control as the work sees it: records progress; canceled from the start or not."""

    def __init__(self, canceled: bool):
        self.canceled = canceled
        self.steps: list[int] = []

    def progress(self, progress: dict, *, force: bool = False) -> None:
        self.steps.append(progress["step"])

    def should_cancel(self) -> bool:
        return self.canceled


def test_a_job_canceled_in_its_batch_ends_canceled_and_the_others_keep_their_results(tmp_path):
    runtime = make_runtime(tmp_path, generate_batch_jobs=8)
    versions = {"red": publish(runtime, "red", 1)}
    jobs = [submit(runtime, versions, adapter, seed=seed) for adapter, seed in (("red", 0), (None, 1), ("red", 2))]
    work = runtime.jobs.work
    controls = [Control(False), Control(True), Control(False)]
    outcomes = work.generate_batch(jobs, controls)
    assert isinstance(outcomes[1], Canceled)
    assert [o.images[0].seed for o in (outcomes[0], outcomes[2])] == [0, 2]
    assert controls[0].steps == controls[2].steps == list(range(1, STEPS + 1))

    everyone = [Control(True) for _ in jobs]
    assert all(isinstance(o, Canceled) for o in work.generate_batch(jobs, everyone))
    assert all(c.steps == [] for c in everyone)  # the batch stopped before its first step


def test_attend_and_excite_jobs_run_alone_and_say_so_in_their_images(tmp_path):
    """A generate job with guidance_method attend-excite (with an adapter) succeeds end to end, claims no companions
    and joins no plain job's batch; its result and PNG metadata say the guidance method; the work's own grouping
    samples an A&E job and a plain one handed to it together as separate batches."""
    runtime = make_runtime(tmp_path, generate_batch_jobs=8)
    versions = {"red": publish(runtime, "red", 1)}
    excite = {"concepts": ("cat", "dog"), "guidance_method": "attend-excite", "excite_scale": 100.0}
    first = submit(runtime, versions, "red", **excite)
    plain = submit(runtime, versions, "red", concepts=("cat", "dog"))
    second = submit(runtime, versions, None, seed=3, **excite)
    assert runtime.run("generate", first) == "succeeded"
    assert row(runtime, plain).status == row(runtime, second).status == "queued"
    assert runtime.run("generate", plain) == "succeeded"
    assert row(runtime, second).status == "queued"
    assert runtime.run("generate", second) == "succeeded"
    result = row(runtime, first).result
    assert result["sample"]["guidance_method"] == "attend-excite" and result["sample"]["excite_scale"] == 100.0
    assert result["images"][0]["heatmap"] is True and row(runtime, plain).result["sample"]["guidance_method"] == "none"
    with runtime.sessions() as session:
        text = Image.open(io.BytesIO(get_image(session, first, "image", 0).data)).text
    assert text["guidance_method"] == "attend-excite" and "Attend-and-Excite scale: 100.0" in text["parameters"]
    assert np.abs(pixels(runtime, first) - pixels(runtime, plain)).max() > 0  # A&E moved the same seed's latents

    together = [submit(runtime, versions, "red", seed=5, **excite), submit(runtime, versions, "red", seed=5)]
    outcomes = runtime.jobs.work.generate_batch(together, [Control(False), Control(False)])
    assert [o.sample["guidance_method"] for o in outcomes] == ["attend-excite", "none"]
