"""Finetuning trains only attn2.to_k, is seeded, resumes exactly, reports progress, cancels, and works."""

import dataclasses
import math
import random

import pytest
import torch

from sepen_core.config import FinetuneConfig, MapConfig, ModelDefaults
from sepen_core.diagnostics import diagnose
from sepen_core.errors import Canceled, CheckpointError, ConceptError
from sepen_core.finetuning import Checkpoints, finetune
from sepen_core.prompts import ConceptSet
from sepen_core.sampling import generate

PAIR = ConceptSet.pairs(("cat", "dog"))
FAST = dict(batch_size=2, learning_rate=1e-2)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def finetuned_weights(model, adapter):
    with adapter.applied(model):
        return snapshot(model)


@pytest.mark.parametrize("prior_weight, changed", [(0.5, 16), (0.0, 10)])
def test_only_key_projections_change(fresh_tiny_model, prior_weight, changed):
    model = fresh_tiny_model
    before = snapshot(model)
    text_before = {n: p.clone() for n, p in model.text_encoder.named_parameters()}
    result = finetune(model, PAIR, FinetuneConfig(steps=2, prior_weight=prior_weight, weight_decay=0.0, **FAST))
    after = finetuned_weights(model, result.adapter)
    keys = set(model.base_keys)
    moved = {n for n in keys if not torch.equal(before[n], after[n])}
    # With the prior loss every key gets gradient; without it, layers after the last map layer
    # (up_blocks.2 and .3) are outside the loss's graph and stay as they were.
    assert len(moved) == changed
    if changed == 10:
        assert all(n.startswith(("up_blocks.2.", "up_blocks.3.")) for n in keys - moved)
    for name, value in before.items():
        if name not in keys:
            assert torch.equal(value, after[name]), name
    assert all(torch.equal(p, text_before[n]) for n, p in model.text_encoder.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters())  # base restored after finetune


def test_seeded_runs_are_identical_and_seeds_differ(tiny_model):
    a = finetune(tiny_model, PAIR, FinetuneConfig(steps=2, seed=1, **FAST)).adapter
    b = finetune(tiny_model, PAIR, FinetuneConfig(steps=2, seed=1, **FAST)).adapter
    c = finetune(tiny_model, PAIR, FinetuneConfig(steps=2, seed=2, **FAST)).adapter
    assert a.sha256 == b.sha256 != c.sha256


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_model, tmp_path, prior_weight):
    config = FinetuneConfig(steps=4, prior_weight=prior_weight, **FAST)
    full = finetune(tiny_model, PAIR, config)
    polls = iter([False, False, True])
    with pytest.raises(Canceled) as info:
        finetune(
            tiny_model, PAIR, config, checkpoint_dir=Checkpoints(tmp_path, every=1), should_cancel=lambda: next(polls)
        )
    assert info.value.step == 2
    assert (tmp_path / "checkpoint.json").exists()
    seen = []
    resumed = finetune(tiny_model, PAIR, config, checkpoint_dir=Checkpoints(tmp_path, every=1), on_step=seen.append)
    assert resumed.resumed_from_step == 2
    assert [r.step for r in seen] == [3, 4]
    assert [r.step for r in resumed.history] == [1, 2, 3, 4]
    for name, delta in full.adapter.deltas.items():
        assert torch.equal(delta, resumed.adapter.deltas[name]), name
    assert [r.loss for r in resumed.history] == [r.loss for r in full.history]


def test_checkpoint_of_another_run_is_refused(tiny_model, tmp_path):
    finetune(tiny_model, PAIR, FinetuneConfig(steps=3, **FAST), checkpoint_dir=Checkpoints(tmp_path, every=1))
    with pytest.raises(CheckpointError, match="another run"):
        finetune(tiny_model, PAIR, FinetuneConfig(steps=3, seed=9, **FAST), checkpoint_dir=tmp_path)


def test_progress_reports(tiny_model):
    reports = []
    finetune(
        tiny_model,
        ConceptSet.pairs(("cat", "dog"), ("car", "tree", "cup")),
        FinetuneConfig(steps=3, **FAST),
        on_step=reports.append,
    )
    assert [r.step for r in reports] == [1, 2, 3] and all(r.total_steps == 3 for r in reports)
    for r in reports:
        assert r.loss == pytest.approx(1.0 * r.separate + 0.5 * r.enhance, rel=1e-5)
        assert 0 < r.min_peak <= min(r.peaks.values()) + 1e-6 and 0 <= r.overlap <= 1
        assert set(r.peaks) <= {"cat", "dog", "car", "tree", "cup"} and r.eta >= 0
    assert reports[-1].eta == 0


def test_unlocatable_concept_fails_before_training(tiny_model):
    bad = ConceptSet.pairs(("cat", "dog"), templates=("a {A} next to a {B}s",))
    with pytest.raises(ConceptError, match="'dog'"):
        finetune(tiny_model, bad, FinetuneConfig(steps=1, **FAST), on_step=lambda r: pytest.fail("trained"))


def test_collection_never_trains_on_held_out_concepts():
    concepts = ConceptSet(collection=("cat", "dog", "horse", "cow", "zebra"), held_out=("zebra",))
    rng = random.Random(0)
    drawn = [concepts.sample(rng) for _ in range(300)]
    used = {c for p in drawn for c in p.concepts}
    assert used == {"cat", "dog", "horse", "cow"}
    assert {p.prompt.split(" a ")[0] for p in drawn} == {"a photo of"}
    assert any(" with a " in p.prompt for p in drawn) and any(" and a " in p.prompt for p in drawn)
    assert all(p.prior_prompt in {f"a photo of a {c}" for c in p.concepts} for p in drawn)


def test_a_collection_with_held_out_concepts_finetunes(tiny_model):
    concepts = ConceptSet(collection=("cat", "dog", "horse", "zebra"), held_out=("zebra",))
    result = finetune(tiny_model, concepts, FinetuneConfig(steps=1, **FAST))
    assert result.history[0].step == 1 and "zebra" not in result.history[0].peaks


def test_sepen_lifts_the_weak_object_and_separates_maps(tiny_model):
    """On the tiny random model, content-normalised SepEn moves both failure signals the right way."""
    maps = MapConfig(normalization="content")
    prompt = "a photo of a cat and a dog"
    before = diagnose(tiny_model, prompt, ["cat", "dog"], maps=maps)
    result = finetune(tiny_model, PAIR, FinetuneConfig(steps=25, batch_size=4, learning_rate=3e-2, maps=maps))
    after = diagnose(tiny_model, prompt, ["cat", "dog"], maps=maps, adapter=result.adapter)
    assert after.min_peak > 1.5 * before.min_peak
    assert after.overlaps["cat & dog"] < 0.8 * before.overlaps["cat & dog"]
    first, last = result.history[:5], result.history[-5:]
    assert sum(r.loss for r in last) < sum(r.loss for r in first)


def test_generated_latents_train_on_the_models_own_samples_and_resume_exactly(tiny_model, tmp_path):
    from sepen_core.objective import generated_pool, make_training_batch

    # the pool is sampled with the model's own settings: two unguided steps keep this test fast
    tiny_model = dataclasses.replace(
        tiny_model, defaults=ModelDefaults(sample={"num_inference_steps": 2, "guidance_scale": 1.0})
    )
    config = FinetuneConfig(steps=3, latents="generated", latent_pool=4, **FAST)
    pool = generated_pool(tiny_model, PAIR, config)
    again = generated_pool(tiny_model, PAIR, config)
    assert pool.latents.shape == (4, 4, 32, 32) and torch.equal(pool.latents, again.latents)
    own = generate(tiny_model, pool.prompts[0].prompt, tiny_model.defaults.sample_config({"num_images": 4}))
    assert not torch.equal(pool.latents, torch.zeros_like(pool.latents)) and own.latents.shape == pool.latents.shape
    batch = make_training_batch(tiny_model, PAIR, config, step=0, pool=pool)
    assert all(p in pool.prompts for p in batch.prompts)
    pseudo = make_training_batch(tiny_model, PAIR, FinetuneConfig(steps=3, **FAST), step=0)
    assert not torch.equal(batch.latents, pseudo.latents)

    full = finetune(tiny_model, PAIR, config)
    with pytest.raises(Canceled):  # once step 1's checkpoint is written (making the pool polls too)
        finetune(
            tiny_model,
            PAIR,
            config,
            checkpoint_dir=Checkpoints(tmp_path, every=1),
            should_cancel=lambda: (tmp_path / "checkpoint.json").exists(),
        )
    resumed = finetune(tiny_model, PAIR, config, checkpoint_dir=Checkpoints(tmp_path, every=1))
    assert resumed.resumed_from_step == 1 and resumed.adapter.sha256 == full.adapter.sha256
    assert full.adapter.metadata["recipe"]["latents"] == "generated"
    assert full.adapter.sha256 != finetune(tiny_model, PAIR, FinetuneConfig(steps=3, **FAST)).adapter.sha256


def test_unknown_latent_source_names_the_field():
    from sepen_core.errors import ConfigError

    with pytest.raises(ConfigError, match="latents"):
        FinetuneConfig(latents="images")
    with pytest.raises(ConfigError, match="latent_pool"):
        FinetuneConfig(latent_pool=0)


def test_a_compiled_capture_trains_the_same_adapter(monkeypatch):
    """compile=True sends each step's map capture through torch.compile (here its eager backend: dynamo's graph
    capture without code generation, seconds instead of minutes on a CPU); the keys learn exactly the same."""
    from sepen_core import attention
    from sepen_core.models import build_tiny_model

    monkeypatch.setattr(attention, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    try:
        plain = finetune(build_tiny_model(seed=0), PAIR, FinetuneConfig(steps=2, **FAST)).adapter
        compiled = finetune(build_tiny_model(seed=0), PAIR, FinetuneConfig(steps=2, compile=True, **FAST)).adapter
        assert attention.compiled_forward_until.cache_info().currsize >= 1  # the compiled path ran
    finally:
        attention.compiled_forward_until.cache_clear()
        torch._dynamo.reset()
    for name, delta in plain.deltas.items():
        assert torch.allclose(compiled.deltas[name].float(), delta.float(), atol=1e-6), name
    assert any(d.abs().max() > 0 for d in plain.deltas.values())


def test_a_half_precision_model_trains_fp32_keys_and_keeps_its_own_weights():
    """bf16 frozen weights, fp32 keys while training: the adapter moves, the steps see fp32 keys, and afterwards the
    model holds its own bf16 key weights, unchanged."""
    from sepen_core.models import key_projection_weights, load_model

    model = load_model("tiny", dtype="bf16")
    before = {name: w.clone() for name, w in key_projection_weights(model.unet).items()}
    seen = []
    result = finetune(
        model,
        PAIR,
        FinetuneConfig(steps=3, **FAST),
        on_step=lambda report: seen.append({w.dtype for w in key_projection_weights(model.unet).values()}),
    )
    assert seen == [{torch.float32}] * 3
    after = key_projection_weights(model.unet)
    assert all(after[name].dtype == torch.bfloat16 and torch.equal(after[name], w) for name, w in before.items())
    assert all(math.isfinite(r.loss) for r in result.history)
    assert max(float(d.float().abs().max()) for d in result.adapter.deltas.values()) > 0


def test_a_checkpoint_resumes_whatever_storage_the_run_asks_for(tiny_model):
    """run_fingerprint hashes what is trained: the recipe fields checkpoints have always carried (compile since it
    came), not how the adapter is stored (rank, energy) or checked (check_samples), so a checkpoint written before
    those existed still resumes."""
    from sepen_core.finetuning import run_fingerprint

    config = FinetuneConfig(steps=4)
    fingerprint = run_fingerprint(tiny_model, PAIR, config)
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(config, rank=4)) == fingerprint
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(config, energy=0.9)) == fingerprint
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(config, check_samples=0)) == fingerprint
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(config, compile=True)) != fingerprint
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(config, steps=5)) != fingerprint
    trajectory = dataclasses.replace(config, latents="trajectory")
    assert run_fingerprint(tiny_model, PAIR, trajectory) != fingerprint
    assert run_fingerprint(tiny_model, PAIR, dataclasses.replace(trajectory, trajectory_window=(0.1, 0.5))) != (
        run_fingerprint(tiny_model, PAIR, trajectory)
    )
    later = {"latents", "latent_pool", "trajectory_window", "teacher_weight"}  # hashed only away from their defaults
    hashed = set(FinetuneConfig.__dataclass_fields__) - {"rank", "energy", "check_samples"} - later
    written_before = {"steps", "learning_rate", "batch_size", "lambda_sep", "lambda_en", "prior_weight", "seed",
                      "grad_mode", "max_grad_norm", "weight_decay", "adam_betas", "adam_epsilon", "latent_size",
                      "maps", "compile"}  # fmt: skip
    assert hashed == written_before, "a new recipe field changes every run's fingerprint: leave it out of the hash"
