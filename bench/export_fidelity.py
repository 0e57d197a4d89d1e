"""Fidelity of an adapter's exports (docs/interop.md): per LoRA rank, the share of squared singular values kept, the
relative Frobenius error against sepen's delta and the file's size; then each full-rank export loaded the way its
users load it (diffusers' `load_lora_weights` for the diffusers and kohya files, W + diff for the full one), its UNet
output for a fixed input against sepen's own apply(), and for a model with a VAE the images of diffusers' pipeline.

    python bench/export_fidelity.py cat-dog.safetensors --model tiny [--ranks 1 2 4 8 16] [--energies 0.9 0.99]
    python bench/export_fidelity.py cherry-sofa.safetensors --model toy --json out.json
    python bench/export_fidelity.py cherry-sofa.safetensors --model toy --success "a cherry and a sofa" --samples 64

With --success (a model with a judge: the toy world's), each rank's adapter and the full one draw the given prompts
(concepts: the model's nouns in them) from the same seeds, in one batch, and the judge counts how often every object
is drawn: each rank's success against the full adapter's, paired.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sepen_core.adapters import KeyProjectionAdapter  # noqa: E402
from sepen_core.attention import unet_forward  # noqa: E402
from sepen_core.config import SampleConfig  # noqa: E402
from sepen_core.evaluation import load_judge  # noqa: E402
from sepen_core.export import export_adapter, kohya_name, sgm_stride  # noqa: E402
from sepen_core.model_card import model_card  # noqa: E402
from sepen_core.models import BaseModel, load_model  # noqa: E402
from sepen_core.sampling import GenerationRequest, generate, generate_batch  # noqa: E402
from sepen_core.stats import paired_difference, wilson_interval  # noqa: E402

PROMPT = "a photo of a cat and a dog"


def rank_table(data: bytes, ranks: list[int], energies: list[float]) -> list[dict]:
    rows = []
    for option in [{"rank": r} for r in ranks] + [{"energy": e} for e in energies] + [{}]:
        export = export_adapter(data, "kohya", **option)  # fp16, the default
        layer_ranks = sorted(set(export.ranks.values()))
        rows.append(
            {
                "option": next((f"--{k} {v}" for k, v in option.items()), "full rank"),
                "ranks": f"{layer_ranks[0]}" if len(layer_ranks) == 1 else f"{layer_ranks[0]}-{layer_ranks[-1]}",
                "energy_kept": export.energy_kept,
                "relative_error": export.relative_error,
                "bytes": len(export.data),
            }
        )
    return rows


def unet_outputs(model: BaseModel, data: bytes, prompt: str) -> list[dict]:
    """Max |output - sepen's| at full rank for each export, and the adapter's own effect max |sepen's - base|."""
    adapter = KeyProjectionAdapter.from_bytes(data)
    cond = model.encode_prompts([prompt])
    size = model.unet.config.sample_size
    latents = torch.randn(1, model.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))

    def output(unet) -> torch.Tensor:
        with torch.no_grad():
            return unet_forward(unet, latents, torch.tensor([500]), cond)

    unet = copy.deepcopy(model.unet)
    base = output(unet)
    with adapter.applied(unet):
        ours = output(unet)
    effect = float((ours - base).abs().max())
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for format in ("diffusers", "kohya", "full"):
            for dtype in ("fp16", "fp32") if format != "full" else ("fp16",):
                export = export_adapter(data, format, dtype=dtype)
                if format == "full":  # what ComfyUI and A1111 do with a .diff key: W + diff
                    unet = copy.deepcopy(model.unet)
                    params = dict(unet.named_parameters())
                    tensors = torch_tensors(export.data)
                    with torch.no_grad():
                        stride = sgm_stride(adapter.layer_names)
                        for name in adapter.layer_names:
                            network = kohya_name(name, adapter.base_architecture, stride)
                            params[name] += tensors[f"{network}.diff"].float()
                else:
                    path = Path(directory) / f"{format}-{dtype}.safetensors"
                    path.write_bytes(export.data)
                    pipe = model.diffusers_pipeline()
                    pipe.load_lora_weights(str(path), adapter_name="sepen")
                    unet = pipe.unet
                diff = float((output(unet) - ours).abs().max())
                rows.append({"format": format, "dtype": dtype, "max_abs": diff, "of_effect": diff / effect})
    return [{"format": "sepen apply() vs base", "dtype": "", "max_abs": effect, "of_effect": 1.0}] + rows


def torch_tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def pipeline_images(model: BaseModel, data: bytes, prompt: str) -> dict | None:
    """Max pixel difference (in [0, 1]) of diffusers' pipeline with the fp16 diffusers export against sepen's
    generate() with apply(), 4 steps, guidance 6, two seeds; None for a model without a VAE."""
    if model.vae is None:
        return None
    adapter = KeyProjectionAdapter.from_bytes(data)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "diffusers.safetensors"
        path.write_bytes(export_adapter(data, "diffusers").data)
        pipe = model.diffusers_pipeline()
        pipe.load_lora_weights(str(path), adapter_name="sepen")
        theirs = pipe(
            prompt,
            num_inference_steps=4,
            guidance_scale=6.0,
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
            output_type="np",
        ).images
    config = SampleConfig(num_inference_steps=4, guidance_scale=6.0, num_images=2, seed=5)
    ours = generate(model, prompt, config, adapter=adapter).pixels.permute(0, 2, 3, 1).numpy()
    base = generate(model, prompt, config).pixels.permute(0, 2, 3, 1).numpy()
    return {"max_abs": float(np.abs(theirs - ours).max()), "adapter_effect": float(np.abs(ours - base).max())}


def low_rank(adapter: KeyProjectionAdapter, rank: int) -> KeyProjectionAdapter:
    """The adapter as its rank-`rank` LoRA export holds it: each delta's truncated SVD, in the adapter's dtype."""
    return adapter.low_rank(rank=rank)


def success_by_rank(
    model: BaseModel, source: str, data: bytes, ranks: list[int], prompts: list[str], samples: int, seed: int
) -> list[dict]:
    """Per rank (and full): the share of images with every named object drawn, and the paired difference from the
    full adapter on the same seeds (the model's judge reads the images)."""
    card = model_card(source)
    judge = load_judge(card.judge, card.path)
    if judge is None:
        raise SystemExit(f"--success needs a model with a judge (the toy world's); {source} has none")
    full = KeyProjectionAdapter.from_bytes(data)
    variants = {"full rank": full, **{f"rank {r}": low_rank(full, r) for r in ranks}}
    outcomes: dict[str, list[bool]] = {name: [] for name in variants}
    for j, prompt in enumerate(prompts):
        concepts = tuple(n for n in card.nouns if n in prompt.split())
        config = model.defaults.sample_config({"num_images": samples, "seed": seed + 1000 * j})
        results = generate_batch(model, [GenerationRequest(prompt, config, a) for a in variants.values()])
        for name, result in zip(variants, results, strict=True):
            outcomes[name] += [judge(pixels, concepts) for pixels in result.pixels]
    rows = []
    for name, got in outcomes.items():
        n, won = len(got), sum(got)
        rows.append(
            {
                "adapter": name,
                "n": n,
                "success": won / n,
                "success_ci95": list(wilson_interval(won, n)),
                "vs_full": paired_difference(outcomes["full rank"], got),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="sepen adapter .safetensors file")
    parser.add_argument("--model", required=True, help="the adapter's base model: tiny, toy or a directory")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--energies", type=float, nargs="+", default=[0.9, 0.99])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--success", nargs="+", metavar="PROMPT", help="prompts to count drawn objects on, per rank")
    parser.add_argument("--samples", type=int, default=32, help="with --success: images per prompt and adapter")
    parser.add_argument("--seed", type=int, default=0, help="with --success: prompt j uses seeds seed + 1000 j + i")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = Path(args.adapter).read_bytes()
    model = load_model(args.model)
    results = {
        "adapter": args.adapter,
        "model": args.model,
        "ranks": rank_table(data, args.ranks, args.energies),
        "unet_outputs": unet_outputs(model, data, args.prompt),
        "images": pipeline_images(model, data, args.prompt),
    }
    if args.success:
        results["success"] = success_by_rank(model, args.model, data, args.ranks, args.success, args.samples, args.seed)
    print(f"| kohya export | ranks | energy kept | relative Frobenius error | bytes |  ({args.adapter}, {args.model})")
    print("|---|---|---|---|---|")
    for row in results["ranks"]:
        print(
            f"| {row['option']} | {row['ranks']} | {row['energy_kept']:.4f} | {row['relative_error']:.2e} | "
            f"{row['bytes']:,} |"
        )
    print("\n| full-rank export | dtype | max abs UNet output difference | of the adapter's effect |")
    print("|---|---|---|---|")
    for row in results["unet_outputs"]:
        print(f"| {row['format']} | {row['dtype']} | {row['max_abs']:.2e} | {row['of_effect']:.1e} |")
    if results["images"] is not None:
        images = results["images"]
        print(
            f"\ndiffusers pipeline vs sepen generate(), fp16 diffusers export: max pixel difference "
            f"{images['max_abs']:.2e} (the adapter itself changes pixels by up to {images['adapter_effect']:.2e})"
        )
    if args.success:
        print("\n| adapter | images | success (95% Wilson) | vs the full adapter (same seeds) | gained / lost | p |")
        print("|---|---:|---|---|---|---:|")
        for row in results["success"]:
            low, high = row["success_ci95"]
            diff = row["vs_full"]
            print(
                f"| {row['adapter']} | {row['n']} | {100 * row['success']:.1f}% ({100 * low:.1f}-{100 * high:.1f}) | "
                f"{100 * diff['difference']:+.1f} [{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}] | "
                f"{diff['gained']} / {diff['lost']} | {diff['p_mcnemar']:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
