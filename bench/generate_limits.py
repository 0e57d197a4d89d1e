"""How long the largest generate requests the gateway accepts take, per model: the check behind limits.max_image_steps.

For each model it times, through the worker's own code (worker.work.Work on an embedded database: load the request,
sample, store the PNGs), the largest requests of each shape that pass service.routes.models.check_image_steps: every
image and step at the native size, and the same image-steps at twice the native side. The job's time limit
(SEPEN_GENERATE_TIME_LIMIT_S, 900 s by default) must hold each with room to spare on the documented hardware.

  OMP_NUM_THREADS=1 python bench/generate_limits.py --json bench/results-generate-limits.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sepen_core.model_card import model_card
from sepen_store.contract import Limits
from sepen_store.database import make_engine, session_factory, upgrade_database
from sepen_store.jobs import create_job
from sepen_store.settings import WorkerSettings
from service.routes.models import MAX_IMAGE_STEPS
from worker.work import Work


class Silent:
    """A JobControl that keeps the last progress and never cancels."""

    def __init__(self):
        self.last = None

    def progress(self, progress: dict, *, force: bool = False) -> None:
        self.last = progress

    def should_cancel(self) -> bool:
        return False


def largest_requests(model: str) -> list[dict]:
    """The largest accepted sample settings of each shape: at the native size, and at twice its side."""
    card = model_card(WorkerSettings().models[model])
    steps = Limits.max_sample_steps
    native = {"num_images": min(Limits.max_images, MAX_IMAGE_STEPS // steps), "num_inference_steps": steps}
    weight = 4**2  # twice the side: four times the area, whose square weighs each image-step
    double = {
        "num_images": max(1, MAX_IMAGE_STEPS // (weight * steps)),
        "num_inference_steps": min(steps, MAX_IMAGE_STEPS // weight),
        "height": card.max_height,
        "width": card.max_width,
    }
    return [native, double]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sepen-tiny", "sepen-toy"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        settings = WorkerSettings(data_dir=data_dir)
        upgrade_database(settings.database_url)
        sessions = session_factory(make_engine(settings.database_url))
        work = Work.create(settings, sessions)
        for model in args.models:
            work.models.get(model)  # loaded before the clock starts, as in a warm worker
            for sample in largest_requests(model):
                request = {
                    "prompt": "a cat and a dog",
                    "model": model,
                    "adapter": None,
                    "concepts": [],
                    "sample": sample,
                }
                with sessions() as session:
                    job, _ = create_job(session, "bench", "generate", request)
                started = time.perf_counter()
                work.generate(job.id, False, Silent())
                seconds = time.perf_counter() - started
                rows.append({"model": model, "sample": sample, "seconds": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "max_image_steps": MAX_IMAGE_STEPS,
        "time_limit_s": WorkerSettings().generate_time_limit_s,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
