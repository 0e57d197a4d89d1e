"""The `sepen` command line: finetune an adapter, generate images, inspect object maps, evaluate an adapter against
the base model, export an adapter for other tools, export the tiny model.

    sepen finetune --model tiny --pair cat dog --steps 200 --out cat-dog.safetensors
    sepen generate "a photo of a cat and a dog" --adapter cat-dog.safetensors --concepts cat dog --out out/
    sepen generate "a photo of a cat and a dog" --concepts cat dog --guidance-method attend-excite --out out/
    sepen inspect "a photo of a cat and a dog" --concepts cat dog --adapter cat-dog.safetensors
    sepen evaluate cat-dog.safetensors --prompt "a photo of a cat and a dog" --concepts cat dog --samples 16
    sepen export cat-dog.safetensors --format kohya --rank 8 --out cat-dog-kohya.safetensors

--model takes `toy` (the default: the bundled toy-world model, which draws recognisable glyphs),
a local diffusers-format Stable Diffusion directory, or `tiny` / `tiny:SEED` for the built-in tiny
random model. Settings left out take the model's own defaults (ModelDefaults), then the paper's.

What can be checked before the work is, before the model loads: the model's name (an unknown one lists what
exists), the concepts against a closed vocabulary (the toy model's nouns), and that every output path can be
written. A finetune whose adapter still cannot be written where asked writes it beside and says where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from sepen_core.config import (
    BUNDLED_SOURCE,
    DTYPE_NAMES,
    EXPORT_DTYPE_NAMES,
    EXPORT_FORMATS,
    GRAD_MODES,
    GUIDANCE_METHODS,
    LATENT_SOURCES,
    MAX_EXCITE_SCALE,
    ModelDefaults,
    SampleConfig,
)
from sepen_core.errors import ConfigError, ModelLoadError, SepenError
from sepen_core.extras import require, version
from sepen_core.model_card import ModelCard, model_card
from sepen_core.prompts import ConceptSet

DEFAULT_MODEL = BUNDLED_SOURCE


def load_model(args: argparse.Namespace):
    """The --model, --device and --dtype of a command (torch is imported only by the commands that need it)."""
    from sepen_core.models import load_model as load

    return load(args.model, device=args.device, dtype=args.dtype)


def model_card_of(args: argparse.Namespace) -> ModelCard:
    """The --model's card, read without torch before any work: a name that is no model fails at once, listing the
    models there are."""
    try:
        return model_card(args.model)
    except ModelLoadError as exc:
        if Path(args.model).exists():  # a directory, but not a model sepen can use: the card says why
            raise SepenError(f"argument --model: {exc}") from exc
        raise SepenError(
            f"argument --model: {args.model!r} is no model name, nor a directory; {known_models()}"
        ) from exc


def known_models() -> str:
    """What --model takes, with the model directories of the current directory."""
    here = sorted(p.name for p in Path.cwd().iterdir() if p.is_dir() and (p / "model_index.json").is_file())
    found = f"; model directories here: {', '.join(here)}" if here else ""
    return (
        f"give {BUNDLED_SOURCE} (the bundled toy-world model, the default), tiny or tiny:SEED, tiny-xl or "
        f"tiny-xl:SEED (random tiny models) or a diffusers Stable Diffusion model directory{found}"
    )


def check_vocabulary(card: ModelCard, args: argparse.Namespace, option: str, concepts: Iterable[str]) -> None:
    """SepenError naming `option` when a concept is not a noun of the model's closed vocabulary (the toy model's)."""
    try:
        card.check_vocabulary([(option, concept) for concept in concepts], args.model)
    except ConfigError as exc:
        raise SepenError(f"argument {exc.field}: {exc.message}") from exc


def check_writable(path: str | Path, option: str, *, directory: bool = False) -> None:
    """SepenError naming `option` unless `path`, a file (or a directory, with `directory`), can be written: checked
    before the work, in the nearest folder on its way that exists, which must be a directory that takes a new file."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise SepenError(f"argument {option}: {path} is a file, not a directory; give a directory")
    if not directory and path.is_dir():
        raise SepenError(f"argument {option}: {path} is a directory; give a file name, such as {path / 'name'}")
    folder = path if directory else path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise SepenError(f"argument {option}: cannot write {path}: {folder} is not a directory; give another path")
    try:
        if not directory and path.exists():
            open(path, "ab").close()  # opened to append, nothing written: the file stays as it is
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise SepenError(
            f"argument {option}: cannot write {path}: {exc.strerror or exc} ({folder}); give another path"
        ) from exc


def save_adapter(adapter, out: str) -> tuple[Path, str | None]:
    """Write a trained adapter to `out`; where that fails after all (the disk filled up, a folder went away), into
    the current directory, else the temporary one, so that the training is not lost: (where it is, why not `out`)."""
    try:
        return adapter.save(out), None
    except OSError as exc:
        reason = f"{exc.strerror or exc}"
    stem, suffix = Path(out).stem or "adapter", Path(out).suffix or ".safetensors"
    for folder in (os.getcwd, tempfile.gettempdir):
        try:
            handle, name = tempfile.mkstemp(prefix=f"{stem}-", suffix=suffix, dir=folder())
            os.close(handle)
        except OSError:  # the current directory may be gone, or not take a file
            continue
        try:
            return adapter.save(name), reason
        except OSError:
            Path(name).unlink(missing_ok=True)
    raise SepenError(f"could not write the adapter to {out} ({reason}), nor to the current or the temporary directory")


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)


def _given(values: dict) -> dict:
    """The settings the command line gave (argparse leaves the others None)."""
    return {k: v for k, v in values.items() if v is not None}


def _given_maps(args) -> dict:
    return _given({"map_downsample": args.map_downsample, "normalization": args.normalization})


def cmd_finetune(args) -> int:
    if args.pair:
        concepts = ConceptSet.pairs(*args.pair, templates=tuple(args.template))
    elif args.collection == "large-scale":
        concepts = ConceptSet.large_scale(templates=tuple(args.template))
    elif args.collection:
        data = json.loads(Path(args.collection).read_text())
        concepts = ConceptSet(
            collection=tuple(data["collection"]),
            held_out=tuple(data.get("held_out", ())),
            templates=tuple(args.template),
        )
    else:
        raise SepenError("give --pair A B (repeatable) or --collection FILE|large-scale")
    card = model_card_of(args)
    named = concepts.collection or [concept for group in concepts.groups for concept in group]
    check_vocabulary(card, args, "--pair" if args.pair else "--collection", named)
    check_writable(args.out, "--out")
    if args.checkpoint_dir is not None:
        check_writable(args.checkpoint_dir, "--checkpoint-dir", directory=True)
    given = _given(
        {
            "steps": args.steps,
            "learning_rate": args.lr,
            "batch_size": args.batch_size,
            "prior_weight": args.prior_weight,
            "lambda_sep": args.lambda_sep,
            "lambda_en": args.lambda_en,
            "grad_mode": args.grad_mode,
            "compile": True if args.compile else None,
            "seed": args.seed,
            "latents": args.latents,
            "latent_pool": args.latent_pool,
            "trajectory_window": tuple(args.trajectory_window) if args.trajectory_window else None,
            "teacher_weight": args.teacher_weight,
            "rank": args.rank,
            "energy": args.energy,
            "check_samples": args.check_samples,
        }
    )
    # Bad settings fail before the model loads.
    ModelDefaults().finetune_config(concepts.mode, {**given, "maps": _given_maps(args)})
    from sepen_core.finetuning import Checkpoints, finetune  # torch: after what fails fast

    model = load_model(args)
    config = model.defaults.finetune_config(concepts.mode, {**given, "maps": _given_maps(args)})
    bar = _progress(config.steps, "finetune")

    def on_step(report):
        bar.n = report.step
        bar.set_postfix(
            loss=f"{report.loss:.4f}", min_peak=f"{report.min_peak:.3f}", overlap=f"{report.overlap:.3f}", refresh=False
        )
        bar.refresh()

    checkpoints = None
    if args.checkpoint_dir is not None:
        checkpoints = Checkpoints(args.checkpoint_dir, every=args.checkpoint_every)
    result = finetune(
        model,
        concepts,
        config,
        on_step=on_step,
        checkpoint_dir=checkpoints,
        adapter_metadata={"name": args.name or Path(args.out).stem},
    )
    bar.close()
    check = _harm_check(card, model, result.adapter, concepts, config.check_samples)
    if check is not None:
        result.adapter.metadata["summary"] = {"check": check}
    path, failure = save_adapter(result.adapter, args.out)
    if failure is not None:
        print(f"sepen finetune: could not write {args.out} ({failure}); the adapter is at {path}", file=sys.stderr)
    first, last = result.history[0], result.history[-1]
    print(f"adapter: {path} ({result.adapter.num_parameters:,} key parameters, base {model.model_id})")
    print(
        f"loss {first.loss:.4f} -> {last.loss:.4f}; weakest peak {first.min_peak:.3f} -> {last.min_peak:.3f}; "
        f"overlap {first.overlap:.3f} -> {last.overlap:.3f}"
    )
    for line in _check_lines(check):
        print(line)
    return 0 if failure is None else 1


def _harm_check(card: ModelCard, model, adapter, concepts: ConceptSet, samples: int) -> dict | None:
    """The do-no-harm check of the new adapter (sepen_core.harm_check), or None with --check-samples 0."""
    from sepen_core.evaluation import load_judge
    from sepen_core.harm_check import HarmCheckConfig, check_adapter

    if not samples:
        return None
    config = HarmCheckConfig(samples, model.defaults.sample_config())
    return check_adapter(model, adapter, concepts, config, judge=load_judge(card.judge, card.path))


def _check_lines(check: dict | None) -> list[str]:
    """The check as the last lines of `sepen finetune`: its verdict, then each pair and noun."""
    if check is None:
        return ["do-no-harm check: off (--check-samples 0)"]
    lines = [
        f"do-no-harm check ({check['samples_per_prompt']} images per prompt and side, held-out seeds): "
        f"{check['verdict']}"
    ]
    for row in check["pairs"] + check["nouns"]:
        what = " and ".join(row["concepts"]) if len(row["concepts"]) > 1 else f"{row['concepts'][0]} alone"
        if row["paired"] is None:
            peaks = f"weakest peak {row['base']['min_peak']:.3f} -> {row['adapter']['min_peak']:.3f}"
            lines.append(f"  {what}: {peaks} ({row['verdict']})")
            continue
        low, high = (100 * x for x in row["paired"]["ci95"])
        lines.append(
            f"  {what}: drawn {100 * row['base']['success']:.0f}% -> {100 * row['adapter']['success']:.0f}%, "
            f"{100 * row['paired']['difference']:+.0f} points [{low:+.0f}, {high:+.0f}] ({row['verdict']})"
        )
    return lines


def _read_adapter(path: str | None):
    from sepen_core.adapters import KeyProjectionAdapter

    return None if path is None else KeyProjectionAdapter.load(path)


def cmd_generate(args) -> int:
    given = {
        **_given(
            {
                "num_inference_steps": args.steps,
                "guidance_scale": args.guidance,
                "height": args.height,
                "width": args.width,
                "guidance_method": args.guidance_method,
                "excite_scale": args.excite_scale,
            }
        ),
        "num_images": args.images,
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
        "maps": _given_maps(args),
    }
    try:  # bad settings fail before the model loads, naming the option
        SampleConfig.from_dict(given)
    except ConfigError as exc:
        option = SAMPLE_OPTIONS.get(exc.field, exc.field.replace("_", "-"))
        raise SepenError(f"argument --{option}: {exc.message}") from exc
    check_guidance(args)
    check_vocabulary(model_card_of(args), args, "--concepts", args.concepts or ())
    check_writable(args.out, "--out", directory=True)
    from sepen_core.sampling import generate  # torch: after what fails fast

    adapter = _read_adapter(args.adapter)
    model = load_model(args)
    config = model.defaults.sample_config(given)
    bar = _progress(config.num_inference_steps, "generate")
    result = generate(
        model, args.prompt, config, adapter=adapter, concepts=args.concepts, on_step=lambda i, total: bar.update(1)
    )
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(result.images)):
        png = result.png(i, adapter=args.adapter, adapter_name=result.adapter_name)  # the file, then its name
        (out / f"image-{i}.png").write_bytes(png)
        print(out / f"image-{i}.png")
        if result.scores is not None:
            result.heatmap(i).save(out / f"heatmap-{i}.png")
            print(out / f"heatmap-{i}.png", json.dumps(result.scores[i].to_dict()))
    if result.scores is not None:
        (out / "scores.json").write_text(json.dumps([s.to_dict() for s in result.scores], indent=2) + "\n")
    return 0


# SampleConfig's field names -> sepen generate's options.
SAMPLE_OPTIONS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images": "images"}


def check_guidance(args: argparse.Namespace) -> None:
    """SepenError naming the option when the guidance method's options do not fit: Attend-and-Excite needs
    --concepts (the objects whose attention it lifts); --excite-scale applies to it alone."""
    excited = args.guidance_method == "attend-excite"
    if excited and not args.concepts:
        raise SepenError(
            "argument --concepts: --guidance-method attend-excite lifts the attention of the objects you name; "
            "give the prompt's objects, e.g. --concepts cat dog"
        )
    if args.excite_scale is not None and not excited:
        raise SepenError("argument --excite-scale: applies with --guidance-method attend-excite only")


def cmd_inspect(args) -> int:
    check_vocabulary(model_card_of(args), args, "--concepts", args.concepts)
    from sepen_core.diagnostics import diagnose  # torch: after what fails fast

    adapter = _read_adapter(args.adapter)
    model = load_model(args)
    runs = [("base", None)] + ([("adapter", adapter)] if adapter is not None else [])
    maps = model.defaults.sample_config({"maps": _given_maps(args)}).maps
    reports = {
        label: diagnose(model, args.prompt, args.concepts, adapter=a, samples=args.samples, seed=args.seed, maps=maps)
        for label, a in runs
    }
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in reports.items()}, indent=2))
        return 0
    normalization = next(iter(reports.values())).normalization
    print(f"prompt: {args.prompt!r}  ({args.samples} pseudo-latents, {normalization} maps)")
    print(f"{'':24}" + "".join(f"{label:>12}" for label in reports))
    for concept in args.concepts:
        print(f"{'peak ' + concept:24}" + "".join(f"{r.peaks[concept]:12.4f}" for r in reports.values()))
    print(f"{'weakest peak':24}" + "".join(f"{r.min_peak:12.4f}" for r in reports.values()))
    for pair in next(iter(reports.values())).overlaps:
        print(f"{'overlap ' + pair:24}" + "".join(f"{r.overlaps[pair]:12.4f}" for r in reports.values()))
    print(f"{'separate loss':24}" + "".join(f"{r.separate_loss:12.4f}" for r in reports.values()))
    return 0


def cmd_evaluate(args) -> int:
    from sepen_core.evaluation import EvaluationConfig, EvaluationPrompt, evaluate_adapter, load_judge

    prompts_given, concepts_given = args.prompt or [], args.concepts or []
    if len(prompts_given) != len(concepts_given):
        raise ConfigError("concepts", "give one --concepts list after each --prompt")
    prompts = [EvaluationPrompt(p, tuple(c)) for p, c in zip(prompts_given, concepts_given, strict=True)]
    card = model_card_of(args)
    check_vocabulary(card, args, "--concepts", (concept for p in prompts for concept in p.concepts))
    if args.json:
        check_writable(args.json, "--json")
    judge = load_judge(card.judge, card.path)
    if not prompts:
        if judge is None:
            raise ConfigError(
                "prompt", "this model has no judge and so no prompts of its own: give --prompt and --concepts"
            )
        prompts = judge.default_prompts()
    sample = _given({"num_inference_steps": args.steps, "guidance_scale": args.guidance, "maps": _given_maps(args)})
    EvaluationConfig(args.samples, args.seed, SampleConfig.from_dict(sample))  # bad settings fail before loading
    adapter = _read_adapter(args.adapter)
    model = load_model(args)
    config = EvaluationConfig(args.samples, args.seed, model.defaults.sample_config(sample))
    bar = _progress(len(prompts), "evaluate")
    bar.unit = "prompt"
    report = evaluate_adapter(model, adapter, prompts, config, judge=judge, on_prompt=lambda i, n: bar.update(1))
    bar.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(evaluation_table(report))
    return 0


def evaluation_table(report: dict) -> str:
    """The report of sepen_core.evaluation as a text table: per prompt and pooled."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    judged = report["judged"]
    head = f"{'prompt':40} {'base':>8} {'adapter':>8} {'change':>8} {'p':>7}   weakest peak base -> adapter"
    lines = [f"{report['samples_per_prompt']} images per prompt and side, seeds from {report['seed']}", head]
    rows = [(r["prompt"], r["base"], r["adapter"], r["paired"]) for r in report["prompts"]]
    summary = report["summary"]
    rows.append(("all prompts", summary["base"], summary["adapter"], summary["paired"]))
    for prompt, base, adapted, paired in rows:
        change = f"{100 * paired['difference']:+.1f}" if paired else "-"
        p_value = f"{paired['p_mcnemar']:.3f}" if paired else "-"
        lines.append(
            f"{prompt[:40]:40} {pct(base['success']):>8} {pct(adapted['success']):>8} {change:>8} {p_value:>7}   "
            f"{base['min_peak']:.4f} -> {adapted['min_peak']:.4f}"
        )
    if judged:
        paired = summary["paired"]
        low, high = (100 * x for x in paired["ci95"])
        lines.append(f"success change {100 * paired['difference']:+.1f} points, 95% CI [{low:+.1f}, {high:+.1f}]")
    else:
        lines.append("no judge for this model: success is not measured, only the attention maps")
    return "\n".join(lines)


def cmd_export(args) -> int:
    from sepen_core.export import export_adapter

    check_writable(args.out, "--out")
    try:
        export = export_adapter(
            Path(args.adapter).read_bytes(), args.format, rank=args.rank, energy=args.energy, dtype=args.dtype
        )
    except ConfigError as exc:  # name the option, as argparse does
        raise SepenError(f"argument --{exc.field}: {exc.message}") from exc
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(export.data)
    print(f"{out}: {export.summary()}")
    return 0


def cmd_export_tiny_model(args) -> int:
    from sepen_core.models import build_tiny_model, build_tiny_xl_model

    check_writable(args.out, "out", directory=True)
    (build_tiny_xl_model if args.xl else build_tiny_model)(args.seed).save_pretrained(args.out)
    print(args.out)
    return 0


class _ShowDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it has no default or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        silent = action.default is None or action.default is False or action.default in (argparse.SUPPRESS, "", [])
        if silent or "default" in help_text or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sepen", description="Separate-and-Enhance compositional finetuning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Every option's help shows its default; "the model's" means the model's own (model_index.json sepen_defaults).
    subcommand = {"formatter_class": _ShowDefaults}

    toy_nouns = ", ".join(model_card(BUNDLED_SOURCE).nouns)  # read from its world.json, without torch

    def model_args(p):
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"toy (the bundled toy-world model; the default; it draws {toy_nouns}), a diffusers Stable Diffusion "
            "1.x/2.x or SDXL directory, or tiny / tiny:SEED (random, SD 1.x's layout) / tiny-xl / tiny-xl:SEED "
            "(SDXL's)",
        )
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
        p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="weights' precision")
        p.add_argument(
            "--normalization",
            choices=["raw", "content"],
            help="object maps: raw softmax (paper) or renormalised over content tokens "
            "(default: the model's, else raw)",
        )
        p.add_argument(
            "--map-downsample", type=int, help="read maps at latent size / this (default: the model's, else 4)"
        )

    p = sub.add_parser("finetune", help="finetune attn2.to_k on concepts and write an adapter", **subcommand)
    model_args(p)
    p.add_argument(
        "--pair", nargs="+", action="append", metavar="CONCEPT", help="a concept pair (or group); repeatable"
    )
    p.add_argument(
        "--collection",
        help="JSON file {collection: [...], held_out: [...]}, or 'large-scale' for the bundled 220 concepts",
    )
    p.add_argument("--template", action="append", default=[], help="prompt template with slots {A}, {B}...; repeatable")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the model's, else the paper's 200)")
    p.add_argument(
        "--lr", type=float, help="learning rate (default: the model's, else the paper's 8e-6 pairs, 4e-6 collection)"
    )
    p.add_argument("--batch-size", type=int, help="prompts per step (default: the model's, else 4)")
    p.add_argument("--prior-weight", type=float, help="prior (norm) loss weight (default 0 pairs, 0.5 collection)")
    p.add_argument("--lambda-sep", type=float, help="Separate loss weight (default: the model's, else 1.0)")
    p.add_argument("--lambda-en", type=float, help="Enhance loss weight (default: the model's, else 0.5)")
    p.add_argument(
        "--grad-mode", choices=GRAD_MODES, help="how the loss reaches the keys (default: the model's, else exact)"
    )
    p.add_argument(
        "--latents",
        choices=LATENT_SOURCES,
        help="training latents: pseudo (Gaussian, the paper; default), generated (the model's own samples), "
        "trajectory (the model's own sampling trajectories at --trajectory-window), attend-excite (Attend-and-Excite's "
        "samples; with --teacher-weight, A&E is the teacher)",
    )
    p.add_argument("--latent-pool", type=int, help="with --latents other than pseudo: samples to make (default 64)")
    p.add_argument(
        "--trajectory-window",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        help="with --latents trajectory or attend-excite: the share of sampling steps trained on (default 0.35 0.7)",
    )
    p.add_argument(
        "--teacher-weight",
        type=float,
        help="with --latents attend-excite: weight of the denoising loss towards A&E's samples (default 0: none)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the map-capture forward: a slow first step, then faster steps on a GPU",
    )
    p.add_argument(
        "--rank",
        type=int,
        help="store the adapter as a rank-RANK factorisation of each layer's delta, capped at its size; training is "
        "the same (default: the full delta)",
    )
    p.add_argument(
        "--energy",
        type=float,
        help="instead of --rank: store per layer the smallest rank keeping this share of the squared singular values",
    )
    p.add_argument(
        "--check-samples",
        type=int,
        help="the do-no-harm check when training ends: images per prompt and side on the adapter's own pairs and "
        "nouns, against the base model on held-out seeds (default 16; 0: no check)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training prompts, noise and timesteps")
    p.add_argument("--checkpoint-dir", help="write checkpoints here and resume from one if present")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--name", help="adapter name stored in its metadata (default: file stem)")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("generate", help="sample images, optionally with an adapter and object maps", **subcommand)
    model_args(p)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--adapter", help="adapter .safetensors file")
    p.add_argument("--concepts", nargs="+", help="record these objects' attention maps and scores")
    p.add_argument("--images", type=int, default=1, help="how many images (image i uses seed + i)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, else 6.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    p.add_argument("--negative-prompt", default="", help="what guidance steers away from")
    p.add_argument(
        "--guidance-method",
        choices=GUIDANCE_METHODS,
        help="attend-excite: Attend-and-Excite lifts the weakest of --concepts (needed) at test time, with or without "
        'an adapter; each image costs several plain ones (docs/benchmarks.md, "Attend-and-Excite\'s cost"); '
        "default none",
    )
    p.add_argument(
        "--excite-scale",
        type=float,
        help=f"Attend-and-Excite's step size, in (0, {MAX_EXCITE_SCALE:g}] (default 20, the published one)",
    )
    p.add_argument("--out", default="out", help="output directory")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser(
        "inspect", help="each object's peak activation and pairwise overlap, before and after an adapter", **subcommand
    )
    model_args(p)
    p.add_argument("prompt", help="the prompt whose attention maps to measure")
    p.add_argument("--concepts", nargs="+", required=True, help="the objects of the prompt to measure")
    p.add_argument("--adapter", help="adapter .safetensors file to compare against the base keys")
    p.add_argument("--samples", type=int, default=16, help="noise samples the statistics average over")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise samples")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser(
        "evaluate",
        help="base model vs adapter on the same prompts and seeds: success (with a judge) and attention maps",
        **subcommand,
    )
    model_args(p)
    p.add_argument("adapter", help="adapter .safetensors file")
    p.add_argument("--prompt", action="append", help="a prompt to evaluate on; repeatable (default: the model's own)")
    p.add_argument(
        "--concepts", nargs="+", action="append", help="the objects of the --prompt before it; once per --prompt"
    )
    p.add_argument("--samples", type=int, default=8, help="images per prompt and side")
    p.add_argument("--seed", type=int, default=0, help="prompt j's images use seeds seed + 1000 j + i")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 50)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, else 6.0)")
    p.add_argument("--json", help="also write the whole report to this file")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="write an adapter as a diffusers or kohya LoRA or a full-rank delta (docs/interop.md)",
        **subcommand,
    )
    p.add_argument("adapter", help="sepen adapter .safetensors file")
    p.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="diffusers (PEFT LoRA: pipe.load_lora_weights), kohya (LoRA: ComfyUI, A1111, diffusers) "
        "or full (the delta itself, .diff keys: ComfyUI, A1111)",
    )
    p.add_argument("--rank", type=int, help="LoRA rank of every layer, capped at its size (default: full rank)")
    p.add_argument(
        "--energy",
        type=float,
        help="instead of --rank: per layer, the smallest rank keeping this share of the squared singular values",
    )
    p.add_argument("--dtype", default="fp16", choices=EXPORT_DTYPE_NAMES, help="the written tensors' precision")
    p.add_argument("--out", required=True, help="file to write (.safetensors)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("export-tiny-model", help="write the tiny random model as a diffusers directory", **subcommand)
    p.add_argument("out", help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--xl", action="store_true", help="the tiny model in SDXL's layout (a StableDiffusionXLPipeline)")
    p.set_defaults(run=cmd_export_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require("sepen", "ml")  # every command runs a model; --help and --version need no extra
    try:
        return args.run(args)
    except SepenError as exc:
        print(f"sepen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file to read that is not there, one that cannot be written...: one line, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"sepen {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
