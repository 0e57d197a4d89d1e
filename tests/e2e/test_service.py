"""The service end to end through HTTP, with real processes: finetune then generate with `name@1`,
downloads, cancellation, a worker killed mid-finetune, a broker restart, and the 4xx answers.
Runs against Postgres + Redis + Celery workers, and again in the embedded mode."""

import io
import json
import re
import time

import psutil
import pytest
from PIL import Image
from safetensors.torch import load as load_safetensors

from sepen_core.adapters import KeyProjectionAdapter
from tests.e2e.conftest import wait_for_job, wait_until

# The tiny random model needs content maps and a large rate to move; its steps are slow enough to catch mid-run.
RESENT = re.compile(r"reconciler re-sent \d+ job\(s\): (.+)")
TINY_RECIPE = {"steps": 8, "batch_size": 2, "learning_rate": 0.02, "normalization": "content"}


def submit_finetune(client, name, steps=8, **extra):
    body = {
        "adapter": name,
        "model": "sepen-tiny",
        "concepts": {"pairs": [["cat", "dog"]]},
        "recipe": {**TINY_RECIPE, "steps": steps},
        **extra,
    }
    response = client.post("/finetune", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_finetune_then_generate_with_the_new_version(deployment, api_key):
    """On the default model (the bundled toy model) with its own recipe and sampling settings."""
    with deployment.client(api_key) as client:
        response = client.post(
            "/finetune",
            json={"adapter": "cherry-brick", "concepts": {"pairs": [["cherry", "brick"]]}, "recipe": {"steps": 8}},
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["kind"] == "finetune"
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["adapter"] == "cherry-brick@1" and result["version"] == 1
        summary = result["summary"]
        assert len(summary["loss_curve"]) == 8
        assert summary["diagnostics"][0]["before"]["concepts"] == ["cherry", "brick"]
        assert done["progress"]["step"] == 8 and done["progress"]["total"] == 8
        # The do-no-harm check ran with the toy model's judge, at its default size, and the version shows it.
        check = summary["check"]
        assert check["verdict"] in ("helps", "no clear effect", "hurts") and check["samples_per_prompt"] == 16
        assert [row["concepts"] for row in check["pairs"]] == [["cherry", "brick"]]
        (version,) = client.get("/adapters/cherry-brick").json()["versions"]
        assert version["check"] == check

        response = client.post(
            "/generate",
            json={
                "prompt": "a cherry and a brick",
                "adapter": "cherry-brick@1",
                "images": 2,
                "seed": 11,
                "concepts": ["cherry", "brick"],
            },
        )
        assert response.status_code == 202, response.text
        gen = wait_for_job(client, response.json()["id"])
        assert gen["status"] == "succeeded", gen
        assert [i["seed"] for i in gen["result"]["images"]] == [11, 12]
        sample = gen["result"]["sample"]  # the toy model's own settings filled what the request left out
        assert (
            sample["num_inference_steps"] == 20
            and sample["guidance_scale"] == 1.0
            and sample["maps"]["map_downsample"] == 2
        )

        png = client.get(f"/jobs/{gen['id']}/images/1")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.size == (32, 32)
        assert image.text["prompt"] == "a cherry and a brick" and image.text["seed"] == "12"
        assert image.text["adapter"] == "cherry-brick@1" and image.text["model"] == "sepen-toy"
        heatmap = client.get(f"/jobs/{gen['id']}/heatmaps/0")
        assert heatmap.status_code == 200 and Image.open(io.BytesIO(heatmap.content)).size[0] == 3 * 128
        assert set(gen["result"]["images"][0]["scores"]["peaks"]) == {"cherry", "brick"}

        weights = client.get("/adapters/cherry-brick/1/weights")
        assert weights.status_code == 200
        adapter = KeyProjectionAdapter.from_bytes(weights.content)
        assert adapter.metadata["job_id"] == job["id"] and adapter.metadata["name"] == "cherry-brick"
        assert adapter.metadata["recipe"]["learning_rate"] == 1e-4  # the toy model's recipe, not the paper's 8e-6
        assert len(adapter.deltas) == 7 and adapter.sha256 == result["sha256"]
        listing = client.get("/adapters/cherry-brick").json()
        assert [v["version"] for v in listing["versions"]] == [1]


def test_cancel_a_queued_and_a_running_job(deployment, api_key):
    with deployment.client(api_key) as client:
        running = submit_finetune(client, "long-one", steps=400)
        wait_until(
            lambda: (client.get(f"/jobs/{running['id']}").json().get("progress") or {}).get("step", 0) >= 2,
            120,
            "the long finetune to start",
        )
        queued = submit_finetune(client, "never-runs", steps=5)  # the solo worker is busy: this one waits
        response = client.post(f"/jobs/{queued['id']}/cancel")
        assert response.status_code == 202 and response.json()["status"] == "canceled"
        response = client.post(f"/jobs/{running['id']}/cancel")
        assert response.status_code == 202 and response.json()["status"] in ("canceling", "canceled")
        final = wait_for_job(client, running["id"], timeout=60)
        assert final["status"] == "canceled" and final["progress"]["step"] < 400
        assert client.post(f"/jobs/{running['id']}/cancel").json()["status"] == "canceled"  # repeating is harmless
        assert client.get(f"/jobs/{queued['id']}").json()["status"] == "canceled"
        assert client.get("/adapters/never-runs").status_code == 404


def test_killed_worker_resumes_and_yields_exactly_one_version(deployment, api_key):
    with deployment.client(api_key) as client:
        job = submit_finetune(client, "survivor", steps=40)
        wait_until(
            lambda: (client.get(f"/jobs/{job['id']}").json().get("progress") or {}).get("step", 0) >= 12,
            120,
            "the finetune to pass its first checkpoints",
        )
        victim = next(w for w in deployment.workers if w.poll() is None)
        job_processes = psutil.Process(victim.pid).children(recursive=True)
        assert job_processes, "the worker runs its jobs in a child process"
        deployment.kill_worker(victim)
        _, alive = psutil.wait_procs(job_processes, timeout=10)
        assert not alive, "the job process outlived its killed worker"
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "running"  # orphaned until its lease runs out
        deployment.start_worker()
        done = wait_for_job(client, job["id"], timeout=180)
        assert done["status"] == "succeeded", done
        assert done["result"]["summary"]["resumed_from_step"] >= 10
        assert done["result"]["adapter"] == "survivor@1"
        assert [v["version"] for v in client.get("/adapters/survivor").json()["versions"]] == [1]


def test_broker_restart_loses_no_queued_job_and_re_sends_each_lost_message_once(deployment, api_key):
    """Jobs whose messages sat in Redis when it restarted (it keeps nothing on disk), and jobs sent while it
    was down, all run once workers are back; two workers' reconcilers re-send each lost message once, and
    never a message that is still waiting in the broker (the queue is longer than the re-send period)."""
    if deployment.redis is None:
        pytest.skip("the embedded mode has no broker server to restart")
    with deployment.client(api_key) as client:
        for worker in deployment.workers:  # nobody consumes: the messages stay queued in Redis
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)

        def submit(seed):
            response = client.post("/generate", json={"prompt": "a photo of a cat", "steps": 12, "seed": seed})
            assert response.status_code == 202, response.text
            return response.json()["id"]

        in_broker = [submit(seed) for seed in range(16)]
        deployment.redis.stop()
        while_down = [submit(seed) for seed in range(16, 19)]  # stored even though they could not be sent
        deployment.redis.start()  # an empty broker: the first sixteen messages are gone
        first_new = len(deployment.workers)
        # One job per message, so that every job needs its own message (a batching worker would run some lost
        # ones as companions before their re-send: tests/e2e/test_batching.py).
        deployment.start_worker(SEPEN_GENERATE_BATCH_JOBS="1")
        deployment.start_worker(SEPEN_GENERATE_BATCH_JOBS="1")
        for job_id in in_broker + while_down:
            assert wait_for_job(client, job_id, timeout=180)["status"] == "succeeded"
        time.sleep(3)  # a few more reconciler rounds with nothing lost
        logs = [(deployment.logs / f"worker-{i}.log").read_text() for i in range(first_new, first_new + 2)]
        resent = [job for log in logs for line in RESENT.findall(log) for job in line.split(", ")]
        print(f"re-sent messages: {len(resent)} for {len(in_broker + while_down)} lost")
        assert sorted(resent) == sorted(in_broker + while_down)


def test_client_errors(deployment, api_key, other_key):
    with (
        deployment.client(api_key) as client,
        deployment.client(other_key) as other,
        deployment.client("sk_sepen_wrong") as stranger,
    ):
        assert stranger.get("/jobs").status_code == 401
        job = client.post("/generate", json={"prompt": "a photo of a cat", "steps": 2}).json()
        assert other.get(f"/jobs/{job['id']}").status_code == 404
        assert other.get("/adapters/cat-dog").status_code == 404
        bad = client.post("/generate", json={"prompt": "a cat", "steps": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "steps"
        missing = client.post("/generate", json={"prompt": "a cat", "adapter": "nope@3"})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
        unknown_model = client.post("/generate", json={"prompt": "a cat", "model": "sd-9"})
        assert unknown_model.status_code == 404 and "sd-9" in unknown_model.json()["error"]["message"]
        huge = client.post(
            "/generate", content=json.dumps({"prompt": "x" * 2_000_000}), headers={"content-type": "application/json"}
        )
        assert huge.status_code == 413
        wait_for_job(client, job["id"])


def test_the_default_model_draws_what_the_prompt_names(deployment, api_key):
    from toyworld.detector import detect
    from toyworld.world import load_world

    with deployment.client(api_key) as client:
        response = client.post("/generate", json={"prompt": "a cherry", "images": 2, "seed": 3})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        images = [Image.open(io.BytesIO(client.get(f"/jobs/{job['id']}/images/{i}").content)) for i in range(2)]
        assert (
            images[0].size == (32, 32)
            and images[0].text["model"] == "sepen-toy"
            and images[0].text["guidance_scale"] == "1.0"
        )
        assert any("cherry" in detect(load_world(), image) for image in images)


def test_evaluate_an_adapter_against_the_base_model(deployment, api_key):
    """On the default toy model: given prompts, then the model's own test pairs; the version shows the result."""
    with deployment.client(api_key) as client:
        finetune = client.post("/finetune", json={"adapter": "evaluated", "concepts": {"pairs": [["cherry", "sofa"]]},
                                                  "recipe": {"steps": 4, "check_samples": 0}})  # fmt: skip
        assert wait_for_job(client, finetune.json()["id"])["status"] == "succeeded"
        prompts = [{"prompt": "a cherry and a sofa", "concepts": ["cherry", "sofa"]}]
        response = client.post("/evaluate", json={"adapter": "evaluated", "prompts": prompts, "samples": 3, "steps": 4})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["adapter"] == "evaluated@1" and result["judged"] is True and result["samples_per_prompt"] == 3
        row = result["prompts"][0]
        assert row["concepts"] == ["cherry", "sofa"] and len(row["base"]["min_peak_by_step"]) == 4
        assert 0 <= row["base"]["success"] <= 1 and row["paired"]["gained"] + row["paired"]["lost"] <= 3
        assert job["progress"] == {"step": 1, "total": 1}

        own = client.post("/evaluate", json={"adapter": "evaluated", "samples": 1, "steps": 2})
        own_job = wait_for_job(client, own.json()["id"])
        assert own_job["status"] == "succeeded", own_job
        assert len(own_job["result"]["prompts"]) == 60  # the toy world's test pairs
        version = client.get("/adapters/evaluated").json()["versions"][0]
        assert version["evaluation"]["job"] == f"/jobs/{own_job['id']}" and version["evaluation"]["prompts"] == 60


def test_an_sdxl_directory_is_served_finetuned_generated_and_exported(deployment, api_key):
    """A diffusers StableDiffusionXLPipeline directory: a low-rank adapter made on it, images with it, its kohya file
    under SDXL's own key names."""
    with deployment.client(api_key) as client:
        (card,) = [m for m in client.get("/models").json() if m["name"] == "tiny-xl"]
        assert card["architecture"] == "sdxl" and card["native_height"] == 64
        response = client.post(
            "/finetune",
            json={"model": "tiny-xl", "adapter": "xl-pair", "concepts": {"pairs": [["cat", "dog"]]},
                  "recipe": {"steps": 3, "learning_rate": 0.01, "rank": 2}},
        )  # fmt: skip
        assert response.status_code == 202, response.text
        done = wait_for_job(client, response.json()["id"])
        assert done["status"] == "succeeded", done
        adapter = KeyProjectionAdapter.from_bytes(client.get("/adapters/xl-pair/1/weights").content)
        assert adapter.base_architecture == "sdxl" and adapter.metadata["storage"]["rank"] == 2
        assert {up.shape[1] for up, _ in adapter.factors.values()} == {2}

        response = client.post(
            "/generate", json={"model": "tiny-xl", "prompt": "a cat and a dog", "adapter": "xl-pair@1", "steps": 3}
        )
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        image = Image.open(io.BytesIO(client.get(f"/jobs/{job['id']}/images/0").content))
        assert image.size == (64, 64) and image.text["model"] == "tiny-xl" and image.text["adapter"] == "xl-pair@1"

        kohya = client.get("/adapters/xl-pair/1/weights", params={"format": "kohya"})
        assert kohya.status_code == 200, kohya.text
        names = set(load_safetensors(kohya.content))
        assert "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in names
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha" in names
