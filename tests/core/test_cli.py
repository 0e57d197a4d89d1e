"""The `sepen` CLI end to end: finetune, generate (PNG metadata with A1111's parameters), inspect on the tiny model;
the toy model by default; generate with Attend-and-Excite; clear errors, and those that can come before the work
(output paths, model names, nouns the model cannot draw) before it; an adapter that cannot be saved where asked is
saved beside.
`sepen export`: tests/core/test_export.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.cli import save_adapter
from sepen_core.model_card import model_card
from sepen_core.models import BUNDLED_MODEL_DIR
from tests.interop import parse_a1111


def sepen(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sepen_core.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_finetune_generate_inspect(tmp_path):
    adapter_path = tmp_path / "cat-dog.safetensors"
    run = sepen(
        "finetune",
        "--model",
        "tiny",
        "--pair",
        "cat",
        "dog",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--normalization",
        "content",
        "--out",
        str(adapter_path),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "loss" in run.stdout and adapter_path.exists()
    adapter = KeyProjectionAdapter.load(adapter_path)
    assert adapter.metadata["name"] == "cat-dog" and adapter.metadata["steps"] == 3

    run = sepen(
        "generate",
        "a photo of a cat and a dog",
        "--model",
        "tiny",
        "--adapter",
        str(adapter_path),
        "--concepts",
        "cat",
        "dog",
        "--images",
        "2",
        "--steps",
        "3",
        "--seed",
        "7",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    image = Image.open(tmp_path / "out" / "image-1.png")
    assert image.size == (64, 64) and image.text["seed"] == "8" and image.text["prompt"] == "a photo of a cat and a dog"
    assert image.text["model"] == "sepen-tiny-random-0" and image.text["adapter"] == str(adapter_path)
    parameters = parse_a1111(image.text["parameters"])  # A1111's infotext: the adapter by its name
    assert parameters["Prompt"] == "a photo of a cat and a dog" and parameters["SepEn adapter"] == "cat-dog"
    assert parameters["Seed"] == "8" and parameters["Steps"] == "3" and parameters["Sampler"] == "DDIM"
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Model"]) == ("64", "64", "sepen-tiny-random-0")
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(scores) == 2 and set(scores[0]["peaks"]) == {"cat", "dog"}
    assert Image.open(tmp_path / "out" / "heatmap-0.png").size[0] == 3 * 128

    run = sepen(
        "inspect",
        "a photo of a cat and a dog",
        "--model",
        "tiny",
        "--concepts",
        "cat",
        "dog",
        "--adapter",
        str(adapter_path),
        "--samples",
        "4",
        "--json",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report) == {"base", "adapter"} and report["base"]["samples"] == 4
    assert report["base"]["peaks"] != report["adapter"]["peaks"]


def test_default_model_is_the_toy_model_with_its_own_settings(tmp_path):
    from toyworld.detector import detect
    from toyworld.world import load_world

    adapter_path = tmp_path / "cherry-sofa.safetensors"
    run = sepen(
        "finetune", "--pair", "cherry", "sofa", "--steps", "2", "--check-samples", "3", "--out", str(adapter_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-4:]  # the do-no-harm check: the verdict, the pair, each noun alone
    assert last[0].startswith("do-no-harm check (3 images per prompt and side, held-out seeds): ")
    assert last[1].startswith("  cherry and sofa: drawn ") and last[2].startswith("  cherry alone: drawn ")
    check = KeyProjectionAdapter.load(adapter_path).metadata["summary"]["check"]
    assert last[0].endswith(check["verdict"]) and check["images"] == 2 * 3 * 4
    recipe = KeyProjectionAdapter.load(adapter_path).metadata["recipe"]
    assert recipe["learning_rate"] == 1e-4 and recipe["batch_size"] == 8 and recipe["maps"]["map_downsample"] == 2

    run = sepen("generate", "a cherry", "--adapter", str(adapter_path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    image = Image.open(tmp_path / "out" / "image-0.png")
    assert image.text["model"] == "sepen-toy" and image.text["steps"] == "20" and image.text["guidance_scale"] == "1.0"
    assert image.size == (32, 32) and "cherry" in detect(load_world(BUNDLED_MODEL_DIR / "world.json"), image)


def test_errors_are_one_readable_line(tmp_path):
    run = sepen("inspect", "a photo of a cat", "--model", "tiny", "--concepts", "cat", "zebra", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().endswith(
        "error: concept 'zebra' does not appear in the prompt as a whole word sequence (prompt: 'a photo of a cat')"
    )
    run = sepen("finetune", "--model", "tiny", "--pair", "cat", "dog", "--steps", "0", "--out", "x.safetensors",
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2 and "steps: must be an integer from 1" in run.stderr
    run = sepen("generate", "a cat", "--model", str(tmp_path / "missing"), cwd=tmp_path)
    assert run.returncode == 2 and f"'{tmp_path / 'missing'}' is no model name, nor a directory" in run.stderr


def one_line_error(run) -> str:
    """The one line a command that failed before its work wrote: exit code 2, no traceback, nothing on stdout."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr
    return run.stderr.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["finetune", "--pair", "cherry", "sofa", "--out", "/dev/null/x.safetensors"],
            "sepen finetune: error: argument --out: cannot write /dev/null/x.safetensors: /dev/null is not a directory",
        ),
        (
            ["finetune", "--pair", "cherry", "sofa", "--out", "a-file/x.safetensors"],
            "argument --out: cannot write a-file/x.safetensors: a-file is not a directory",
        ),
        (["finetune", "--pair", "cherry", "sofa", "--out", "."], "argument --out: . is a directory; give a file name"),
        (
            ["finetune", "--pair", "cherry", "sofa", "--checkpoint-dir", "a-file", "--out", "x.safetensors"],
            "argument --checkpoint-dir: a-file is a file, not a directory",
        ),
        (
            ["generate", "a cherry", "--out", "/dev/null/out/"],
            "sepen generate: error: argument --out: cannot write /dev/null/out: /dev/null is not a directory",
        ),
        (["generate", "a cherry", "--out", "a-file"], "argument --out: a-file is a file, not a directory"),
        (
            ["evaluate", "x.safetensors", "--json", "/dev/null/report.json"],
            "argument --json: cannot write /dev/null/report.json: /dev/null is not a directory",
        ),
    ],
    ids=["finetune-dev-null", "finetune-under-a-file", "finetune-a-directory", "checkpoints-a-file",
         "generate-dev-null", "generate-a-file", "evaluate-json"],
)  # fmt: skip
def test_an_output_path_that_cannot_be_written_fails_before_the_work(tmp_path, args, message):
    (tmp_path / "a-file").write_text("not a directory")
    assert message in one_line_error(sepen(*args, cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, nothing half made


def test_an_unknown_model_fails_before_the_work_naming_the_models_there_are(tmp_path):
    (tmp_path / "my-sd15").mkdir()
    (tmp_path / "my-sd15" / "model_index.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    run = sepen("finetune", "--model", "nosuchmodel", "--pair", "cat", "dog", "--out", "x.safetensors", cwd=tmp_path)
    line = one_line_error(run)
    assert line.startswith("sepen finetune: error: argument --model: 'nosuchmodel' is no model name, nor a directory")
    for name in ("toy (the bundled toy-world model, the default)", "tiny or tiny:SEED", "tiny-xl or tiny-xl:SEED"):
        assert name in line
    assert line.endswith("model directories here: my-sd15")
    run = sepen("generate", "a cat", "--model", "nosuchmodel", cwd=tmp_path)
    assert "argument --model: 'nosuchmodel' is no model name" in one_line_error(run)


def test_nouns_the_toy_model_cannot_draw_fail_before_the_work_listing_its_nouns(tmp_path):
    nouns = ", ".join(model_card("toy").nouns)
    run = sepen("finetune", "--pair", "cherry", "giraffe", "--out", "x.safetensors", cwd=tmp_path)
    line = one_line_error(run)
    assert line.startswith("sepen finetune: error: argument --pair: model 'toy' cannot draw 'giraffe'")
    assert f"24 nouns ({nouns})" in line
    run = sepen("generate", "a cherry and a giraffe", "--concepts", "cherry", "giraffe", "--out", "out", cwd=tmp_path)
    assert "error: argument --concepts: model 'toy' cannot draw 'giraffe'" in one_line_error(run)
    run = sepen("inspect", "a cherry and a giraffe", "--concepts", "Cherry", "giraffe", cwd=tmp_path)
    assert "error: argument --concepts: model 'toy' cannot draw 'giraffe'" in one_line_error(run)
    assert list(tmp_path.iterdir()) == []


class _Adapter:
    """What save_adapter needs of a KeyProjectionAdapter: save(path) as it does it."""

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"trained weights")
        return path


def test_an_adapter_that_cannot_be_saved_where_asked_is_saved_beside(tmp_path, monkeypatch):
    """The check before the work passed, but the save after it fails (the folder became a file meanwhile): the
    adapter goes to the current directory, or where that takes no file, to the temporary directory."""
    (tmp_path / "work").mkdir()
    (tmp_path / "gone").write_text("was a folder")
    monkeypatch.chdir(tmp_path / "work")
    path, failure = save_adapter(_Adapter(), str(tmp_path / "gone" / "cherry-sofa.safetensors"))
    assert failure is not None and path.parent == tmp_path / "work" and path.read_bytes() == b"trained weights"
    assert path.name.startswith("cherry-sofa-") and path.suffix == ".safetensors"

    (tmp_path / "vanishing").mkdir()
    monkeypatch.chdir(tmp_path / "vanishing")
    (tmp_path / "vanishing").rmdir()  # the current directory itself is gone: the temporary directory
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    path, failure = save_adapter(_Adapter(), str(tmp_path / "gone" / "cherry-sofa.safetensors"))
    assert failure is not None and path.parent == tmp_path / "temp" and path.read_bytes() == b"trained weights"
    path, failure = save_adapter(_Adapter(), str(tmp_path / "temp" / "fine.safetensors"))
    assert failure is None and path == tmp_path / "temp" / "fine.safetensors"


def test_every_option_explains_itself_and_shows_its_default():
    """`sepen CMD --help` gives each option a line of help, and a default where one applies."""
    import argparse

    from sepen_core.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"sepen {name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        if any("--seed" in a.option_strings for a in sub._actions):
            assert "(default: 0)" in " ".join(text.split()), f"sepen {name} --help does not show --seed's default"


def test_an_sdxl_directory_through_the_cli(tmp_path):
    """export-tiny-model --xl writes a StableDiffusionXLPipeline directory; finetune stores a low-rank adapter on it,
    generate and inspect use it, and its kohya export carries SDXL's own key names."""
    model_dir, adapter_path, kohya_path = (
        tmp_path / "tiny-xl",
        tmp_path / "xl.safetensors",
        tmp_path / "kohya.safetensors",
    )
    run = sepen("export-tiny-model", "--xl", str(model_dir), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((model_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    common = ("--model", str(model_dir))
    run = sepen("finetune", *common, "--pair", "cat", "dog", "--steps", "2", "--lr", "1e-2", "--rank", "4",
                "--out", str(adapter_path), cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    adapter = KeyProjectionAdapter.load(adapter_path)
    assert adapter.base_architecture == "sdxl" and adapter.metadata["storage"]["rank"] == 4
    run = sepen("generate", "a cat and a dog", *common, "--adapter", str(adapter_path), "--steps", "2",
                "--out", str(tmp_path / "images"), cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Image.open(next((tmp_path / "images").glob("*.png"))).size == (64, 64)
    run = sepen("inspect", "a cat and a dog", *common, "--concepts", "cat", "dog", "--adapter", str(adapter_path),
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0 and "cat" in run.stdout, run.stderr
    run = sepen("export", str(adapter_path), "--format", "kohya", "--out", str(kohya_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    header = json.loads(kohya_path.read_bytes()[8 : 8 + int.from_bytes(kohya_path.read_bytes()[:8], "little")])
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in header


def test_generate_with_attend_and_excite(tmp_path):
    """--guidance-method attend-excite samples with A&E (its images say so); it needs --concepts, and --excite-scale
    is checked and applies to it alone: each a one-line error naming the option, before the work."""
    out = tmp_path / "out"
    args = ["generate", "a cherry and a sofa", "--steps", "4", "--out", str(out)]
    run = sepen(*args, "--concepts", "cherry", "sofa", "--guidance-method", "attend-excite", "--excite-scale", "30",
                cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    image = Image.open(out / "image-0.png")
    assert image.text["guidance_method"] == "attend-excite" and image.text["excite_scale"] == "30.0"
    assert "Attend-and-Excite scale: 30.0" in image.text["parameters"] and (out / "heatmap-0.png").exists()
    refusals = [
        (["--guidance-method", "attend-excite"], "argument --concepts: --guidance-method attend-excite lifts"),
        (["--concepts", "cherry", "sofa", "--excite-scale", "30"], "argument --excite-scale: applies with"),
        (["--guidance-method", "attend-excite", "--concepts", "cherry", "sofa", "--excite-scale", "0"],
         "argument --excite-scale: must be a number in (0, 10000]"),
    ]  # fmt: skip
    for extra, message in refusals:
        assert message in one_line_error(sepen(*args[:-2], *extra, "--out", str(tmp_path / "none"), cwd=tmp_path))
    assert not (tmp_path / "none").exists()
