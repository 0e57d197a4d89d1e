"""The recipe's trajectory sources: SepEn's losses on the base model's own sampling trajectories (latents
"trajectory"), and Attend-and-Excite as a teacher (latents "attend-excite" with teacher_weight): what the pools hold,
what a step trains on, the teacher's target in each parametrisation, and exact resume."""

import dataclasses

import pytest
import torch

from sepen_core.config import FinetuneConfig, ModelDefaults
from sepen_core.errors import Canceled, ConfigError
from sepen_core.finetuning import Checkpoints, finetune
from sepen_core.objective import denoising_target, generated_pool, make_training_batch, sepen_objective, window_steps
from sepen_core.prompts import ConceptSet
from sepen_core.sampling import generate

PAIR = ConceptSet.pairs(("cat", "dog"))
FAST = dict(batch_size=2, learning_rate=1e-2, latent_pool=2)


@pytest.fixture
def short_sampling(tiny_model):
    """The tiny model sampling 4 unguided steps: the pools are made with the model's own settings."""
    return dataclasses.replace(
        tiny_model, defaults=ModelDefaults(sample={"num_inference_steps": 4, "guidance_scale": 1.0})
    )


def test_the_window_is_a_share_of_the_sampling_steps():
    assert window_steps(FinetuneConfig(), 20) == (7, 8, 9, 10, 11, 12, 13)  # steps 8-14 of 20, 1-based
    assert window_steps(FinetuneConfig(trajectory_window=(0.0, 0.5)), 4) == (0, 1)
    assert window_steps(FinetuneConfig(trajectory_window=(0.9, 0.95)), 4) == (3,)  # never empty


def test_sampling_records_the_latents_it_denoises_at_the_asked_steps(short_sampling):
    config = short_sampling.defaults.sample_config({"num_images": 2})
    plain = generate(short_sampling, "a photo of a cat and a dog", config)
    recorded = generate(short_sampling, "a photo of a cat and a dog", config, record_steps=(0, 2))
    assert torch.equal(plain.latents, recorded.latents) and plain.trajectory == {}
    assert sorted(recorded.trajectory) == [0, 2]
    scheduler = type(short_sampling.scheduler).from_config(short_sampling.scheduler.config)
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps
    first_t, first = recorded.trajectory[0]
    assert first.shape == plain.latents.shape and first_t == int(timesteps[0])
    noise = torch.cat([torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    assert torch.allclose(first, noise * short_sampling.scheduler.init_noise_sigma)  # step 0 denoises the noise
    assert not torch.equal(recorded.trajectory[2][1], first)


def test_trajectory_latents_are_the_models_own_at_the_window_steps(short_sampling):
    config = FinetuneConfig(steps=2, latents="trajectory", trajectory_window=(0.5, 1.0), **FAST)
    pool = generated_pool(short_sampling, PAIR, config)
    assert pool.latents.shape == (4, 4, 32, 32) and len(pool.prompts) == 4  # 2 samples x steps 2 and 3
    sample = generate(
        short_sampling,
        pool.prompts[0].prompt,
        short_sampling.defaults.sample_config({"num_images": 1, "seed": _pool_seed(config)}),
        record_steps=(2, 3),
    )
    assert [int(t) for t in pool.timesteps[:2]] == [sample.trajectory[2][0], sample.trajectory[3][0]]
    assert torch.allclose(pool.latents[0], sample.trajectory[2][1][0], atol=1e-5)
    batch = make_training_batch(short_sampling, PAIR, config, step=0, pool=pool)
    rows = [[torch.equal(x, y) for y in pool.latents] for x in batch.latents]
    assert all(any(r) for r in rows)  # each training latent is one of the trajectory's, not re-noised
    assert set(batch.timesteps.tolist()) <= set(pool.timesteps.tolist()) and batch.teacher_target is None


def _pool_seed(config):
    from sepen_core.checkpoints import step_seed
    from sepen_core.objective import POOL_STEP

    return step_seed(config.seed, POOL_STEP + 1) % (2**31 - 4096)


def test_the_teacher_is_attend_and_excite_and_its_loss_trains_the_keys(short_sampling, tmp_path):
    teacher = FinetuneConfig(steps=2, latents="attend-excite", teacher_weight=1.0, **FAST)
    pool = generated_pool(short_sampling, PAIR, teacher)
    plain = generated_pool(short_sampling, PAIR, dataclasses.replace(teacher, latents="generated", teacher_weight=0))
    assert pool.latents.shape == plain.latents.shape and not torch.allclose(pool.latents, plain.latents)
    assert pool.window is not None and pool.timesteps is None  # clean samples, noised at the window's timesteps
    batch = make_training_batch(short_sampling, PAIR, teacher, step=0, pool=pool)
    assert set(batch.timesteps.tolist()) <= set(pool.window.tolist())
    assert batch.teacher_target is not None and batch.teacher_target.shape == batch.latents.shape
    out = sepen_objective(short_sampling, batch, teacher)
    assert out.loss.teacher is not None and out.loss.teacher > 0
    expected = out.loss.separate * teacher.lambda_sep + out.loss.enhance * teacher.lambda_en + out.loss.teacher
    assert torch.allclose(out.loss.total, expected)

    full = finetune(short_sampling, PAIR, teacher)
    with pytest.raises(Canceled):
        finetune(
            short_sampling,
            PAIR,
            teacher,
            checkpoint_dir=Checkpoints(tmp_path, every=1),
            should_cancel=lambda: (tmp_path / "checkpoint.json").exists(),
        )
    resumed = finetune(short_sampling, PAIR, teacher, checkpoint_dir=Checkpoints(tmp_path, every=1))
    assert resumed.resumed_from_step == 1 and resumed.adapter.sha256 == full.adapter.sha256
    no_teacher = dataclasses.replace(teacher, teacher_weight=0.0)
    assert finetune(short_sampling, PAIR, no_teacher).adapter.sha256 != full.adapter.sha256


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_teachers_target_is_what_the_unet_predicts_in_its_parametrisation(tiny_model, kind):
    sampler = type(tiny_model.scheduler).from_config(tiny_model.scheduler.config, prediction_type=kind)
    model = dataclasses.replace(tiny_model, scheduler=sampler)  # its training schedule follows the sampler's
    scheduler = model.noise_scheduler
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = denoising_target(model, clean, noise, t)
    alpha = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    expected = {"epsilon": noise, "v_prediction": alpha * noise - sigma * clean, "sample": clean}[kind]
    assert torch.allclose(target, expected, atol=1e-5)


def test_bad_trajectory_settings_name_their_field():
    with pytest.raises(ConfigError, match="teacher_weight"):
        FinetuneConfig(teacher_weight=1.0)  # a teacher needs its samples
    with pytest.raises(ConfigError, match="trajectory_window"):
        FinetuneConfig(trajectory_window=(0.7, 0.3))
    with pytest.raises(ConfigError, match="trajectory_window"):
        FinetuneConfig(trajectory_window=(0.0, 1.5))
    assert FinetuneConfig(latents="attend-excite", teacher_weight=2.0, lambda_sep=0, lambda_en=0).teacher_weight == 2
