"""train.py end to end: a short run, a resume that ends where an uninterrupted run ends, a loadable model."""

import json
import time
from dataclasses import replace

import pytest
import torch

from sepen_core.models import load_base_model
from toyworld.evaluate import EvalConfig
from toyworld.train import Cadence, TrainConfig, main, train


def test_train_resume_and_saved_model(tmp_path):
    began = time.perf_counter()
    common = [
        "--batch-size",
        "8",
        "--warmup",
        "4",
        "--checkpoint-every",
        "5",
        "--log-every",
        "5",
        "--eval-samples",
        "0",
    ]
    main(["--out", str(tmp_path / "resumed"), "--steps", "10", *common])
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 10
    main(["--out", str(tmp_path / "resumed"), "--steps", "20", *common])  # resumes at 10 (steps may be extended)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [5, 10, 15, 20]

    # The uninterrupted run, with an end-of-run evaluation. decay_fraction=0: the 10-step and the
    # 20-step run share their learning rates, so the resumed run must end on the same weights.
    config = TrainConfig(steps=20, batch_size=8, warmup_steps=4, decay_fraction=0.0)
    cadence = Cadence(log_every=5, checkpoint_every=5)
    train(tmp_path / "a", replace(config, steps=10), cadence=cadence)
    train(tmp_path / "a", config, cadence=cadence)
    model_dir = train(
        tmp_path / "b", config, eval_config=EvalConfig(samples_per_group=2, num_inference_steps=2), cadence=cadence
    )
    a, b = load_base_model(tmp_path / "a" / "model"), load_base_model(model_dir)
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    summary = json.loads((model_dir / "training.json").read_text())
    assert summary["steps"] == 20 and summary["evals"][-1]["step"] == 20
    assert set(summary["evals"][-1]["results"]) == {"single", "train_pairs", "heldout_pairs"}
    assert (tmp_path / "b" / "eval-0000020.png").exists() and (model_dir / "world.json").exists()
    assert b.mask_padding and b.tokenizer.model_max_length == 16
    # 80 steps at batch 8 and a small evaluation: about 50 s on the slowest CI machine seen (2-core EPYC, fp32), alone;
    # the bound catches a step that became an order of magnitude slower, not a machine loaded by other work.
    assert time.perf_counter() - began < 500


def test_warm_start_copies_a_saved_models_weights_and_refuses_another_shape(tmp_path):
    from sepen_core.errors import CheckpointError
    from toyworld.model import ToyModelConfig, build_toy_model
    from toyworld.train import warm_start

    saved = train(tmp_path / "a", TrainConfig(steps=2, batch_size=2, warmup_steps=1), cadence=Cadence(log_every=1))
    model = build_toy_model(seed=5)
    warm_start(model, saved)
    reference = load_base_model(saved)
    for (name, mine), theirs in zip(model.unet.state_dict().items(), reference.unet.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
    assert TrainConfig(init_from=str(saved)).fingerprint() != TrainConfig().fingerprint()
    wider = build_toy_model(ToyModelConfig(block_out_channels=(32, 64, 128)))
    with pytest.raises(CheckpointError, match="another shape"):
        warm_start(wider, saved)
