"""The deployment files hold together: compose parses offline (alone and with the GPU override) and wires every
service it promises, the images install the extras the compose services need, .env.example is true to the
code and to compose, and scripts/bootstrap, the Dockerfile and the README install the same torch (its CPU wheel
unless the CUDA build is asked for)."""

import os
import re
import shutil
import subprocess
import tomllib

import pytest

from sepen_store.settings import ALL_SETTINGS, setting_names
from tests.deployment import (
    COMPOSE,
    COMPOSE_GPU,
    DOCKERFILE,
    ENV_EXAMPLE,
    ROOT,
    SUBSTITUTION,
    app_services,
    compose_defaults,
    dockerfile_stages,
    env_example,
    load_compose,
    stage_command,
    stage_extras,
    substituted,
)

# Read by docker compose (a volume; the api command's uvicorn --workers) and scripts/start, not by the service.
COMPOSE_ONLY = {"SEPEN_MODELS_DIR", "SEPEN_GATEWAY_WORKERS"}


def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^(SEPEN_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert listed == setting_names() | COMPOSE_ONLY


def test_env_example_values_are_the_code_defaults(monkeypatch):
    """Every value .env.example gives is what the service does without it (an empty one means the default)."""
    for name in [name for name in os.environ if name.startswith("SEPEN_")]:
        monkeypatch.delenv(name)
    for name, (value, _) in env_example().items():
        if name in setting_names():
            monkeypatch.setenv(name, value)
    for cls in ALL_SETTINGS:
        assert cls.from_env().model_dump() == cls().model_dump(), cls.__name__


def test_env_example_names_every_value_compose_uses_instead():
    """A variable a compose file fills with its own value when unset says so in .env.example, with that value."""
    example = env_example()
    for path in (COMPOSE, COMPOSE_GPU):
        for name, default in compose_defaults(path).items():
            assert name in example, f"{path.name} reads {name}, which .env.example does not list"
            if default and default != example[name][0]:
                note = f"# {path.name}: {default}"
                assert any(line.startswith(note) for line in example[name][1]), f"{name}: .env.example lacks {note!r}"


def test_compose_services_and_their_wiring():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "seaweedfs", "migrate", "api", "worker"}
    assert list(app_services(compose)) == ["migrate", "api", "worker"]  # the order CI runs them in
    assert "noeviction" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["sepen-admin", "migrate"]
    assert services["api"]["command"][:3] == ["uvicorn", "--factory", "service.app:app_from_env"]
    assert services["worker"]["command"][0] == "sepen-worker"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["build"]["target"] == "api" and services["worker"]["build"]["target"] == "worker"
    assert "deploy" not in services["worker"], "the default deployment must start on a machine without a GPU"
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], name
    for name in ("api", "worker"):  # the same model paths in every process that reads SEPEN_MODELS
        assert "${SEPEN_MODELS_DIR:-./models}:/models:ro" in services[name]["volumes"], name
    environment = services["api"]["environment"]
    assert set(environment) == setting_names() - {"SEPEN_DATA_DIR"}
    for name in ("migrate", "worker"):
        assert services[name]["environment"] == environment, name
    for name, value in environment.items():  # every setting, the URLs too, can come from .env
        match = SUBSTITUTION.fullmatch(value)
        assert match and match.group(1) == name, f"{name}: {value!r} does not come from ${{{name}}}"
    assert compose_defaults(COMPOSE)["SEPEN_DEVICE"] in ("", "cpu")


def test_the_object_store_is_optional_and_wired_to_the_services():
    """SeaweedFS starts only with `--profile s3`, telemetry off, with the credentials and port the services use; the
    blobs stay in the database unless .env says s3."""
    compose = load_compose()
    store = compose["services"]["seaweedfs"]
    assert store["profiles"] == ["s3"] and store["image"].startswith("chrislusf/seaweedfs:")
    assert store["command"][:1] == ["server"] and "-s3" in store["command"]
    assert "-master.telemetry=false" in store["command"] and "-s3.port=8333" in store["command"]
    assert store["ports"] == ["127.0.0.1:8333:8333"]  # the host's loopback only: presigned URLs, no open store
    api = compose["services"]["api"]["environment"]
    for name, seaweed in (
        ("SEPEN_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
        ("SEPEN_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    ):
        assert store["environment"][seaweed] == api[name] == f"${{{name}:-}}"  # one identity, from .env
    for name in ("SEPEN_BLOB_BACKEND", "SEPEN_S3_ENDPOINT_URL", "SEPEN_S3_BUCKET"):
        assert compose_defaults(COMPOSE)[name] == "", name  # the service's own defaults: blobs in the database
    example = ENV_EXAMPLE.read_text()  # .env.example shows the lines that wire the services to it
    assert "#   SEPEN_BLOB_BACKEND=s3" in example and "#   SEPEN_S3_ENDPOINT_URL=http://seaweedfs:8333" in example
    assert "healthcheck" in store and "seaweedfsdata:/data" in store["volumes"]


def test_gpu_override_reserves_a_gpu_for_the_worker_only():
    override = load_compose(COMPOSE_GPU)["services"]
    assert set(override) == {"worker"}
    worker = override["worker"]
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert compose_defaults(COMPOSE_GPU)["SEPEN_DEVICE"] == "cuda"


def _compose_config(env_file, *files, profile: str | None = None) -> subprocess.CompletedProcess:
    command = ["docker-compose", "--env-file", str(env_file)]
    for path in files:
        command += ["-f", str(path)]
    if profile:
        command += ["--profile", profile]
    return subprocess.run([*command, "config"], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")
def test_compose_files_validate_offline_alone_and_with_the_gpu_override(tmp_path):
    import yaml

    empty_env = tmp_path / "empty.env"  # instead of a developer's .env
    empty_env.write_text("")
    cpu = _compose_config(empty_env, COMPOSE)
    assert cpu.returncode == 0, cpu.stderr
    worker = yaml.safe_load(cpu.stdout)["services"]["worker"]
    assert "deploy" not in worker and worker["environment"]["SEPEN_DEVICE"] in ("", "cpu")
    assert worker["environment"]["SEPEN_DATABASE_URL"] == "postgresql+psycopg://sepen:sepen@postgres:5432/sepen"

    gpu = _compose_config(empty_env, COMPOSE, COMPOSE_GPU)
    assert gpu.returncode == 0, gpu.stderr
    services = yaml.safe_load(gpu.stdout)["services"]
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert worker["environment"]["SEPEN_DEVICE"] == "cuda" and worker["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert worker["build"]["target"] == "worker" and worker["command"] == ["sepen-worker"]  # merged, not replaced
    assert "deploy" not in services["api"] and services["api"]["environment"]["SEPEN_DEVICE"] in ("", "cpu")

    if "--profile" in subprocess.run(["docker-compose", "--help"], capture_output=True, text=True).stdout:
        store = _compose_config(empty_env, COMPOSE, profile="s3")  # the optional object store
        assert store.returncode == 0, store.stderr
        services = yaml.safe_load(store.stdout)["services"]
        assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")


def test_dockerfile_installs_each_image_with_its_extra():
    stages = dockerfile_stages()
    assert {"build", "base", "api", "worker"} <= set(stages)
    assert stage_extras(stages["api"]) == ["api"] and stage_extras(stages["worker"]) == ["worker"]
    api = " ".join(stages["api"])
    assert "--no-deps" not in api and "fastapi" not in api, "the api image takes its packages from the api extra"
    assert "'torch' not in sys.modules" in api and "find_spec('torch') is None" in api
    worker = " ".join(stages["worker"])
    assert "ARG TORCH_VARIANT=cpu" in worker and "download.pytorch.org/whl/cpu" in worker
    # The images run what compose runs.
    services = load_compose()["services"]
    assert stage_command(stages["api"]) == [substituted(part) for part in services["api"]["command"]]
    assert stage_command(stages["worker"]) == services["worker"]["command"]
    # The images install the wheel built from every package of pyproject.toml, and hold no source tree.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    build = " ".join(stages["build"])
    for package in packages:
        assert f"COPY {package} ./{package}" in build, package
    assert "pip wheel --no-deps -w /dist ." in build and "COPY migrations" not in build and "alembic.ini" not in build
    for name in ("base", "api", "worker"):  # only the wheel comes in from the build stage
        copies = [line for line in stages[name] if line.startswith("COPY")]
        assert all(line.startswith("COPY --from=build /dist ") for line in copies), f"{name}: {copies}"


def test_torch_is_pinned_to_one_version_everywhere():
    files = [ROOT / "pyproject.toml", DOCKERFILE, ROOT / "scripts" / "bootstrap"]
    pins = {path.name: set(re.findall(r"torch==([\w.+]+)", path.read_text())) for path in files}
    assert all(pins.values()), pins
    assert len(set().union(*pins.values())) == 1, pins


CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _pin(command: str) -> str:
    (pin,) = re.findall(r"torch==([\w.+]+)", command)
    return pin


def test_bootstrap_the_dockerfile_and_the_readme_install_torch_alike():
    """The CPU wheel from PyTorch's index, at pyproject.toml's pin, where no GPU is asked for; PyPI's (CUDA) build
    where it is: SEPEN_TORCH=cuda for scripts/bootstrap, TORCH_VARIANT=cuda for the worker image."""
    (pin,) = re.findall(r'"torch==([\w.+]+)"', (ROOT / "pyproject.toml").read_text())
    bootstrap = (ROOT / "scripts" / "bootstrap").read_text()
    branches = dict(re.findall(r"^\s*(cpu|cuda)\) torch=\((.*)\) ;;$", bootstrap, re.M))
    assert set(branches) == {"cpu", "cuda"}, bootstrap
    assert CPU_INDEX in branches["cpu"] and _pin(branches["cpu"]) == pin
    assert "--index-url" not in branches["cuda"] and _pin(branches["cuda"]) == pin
    installs = [line.strip() for line in bootstrap.splitlines() if "pip install" in line]
    assert installs.index('.venv/bin/python -m pip install -q "${torch[@]}"') < installs.index(
        '.venv/bin/python -m pip install -q -e ".[test]"'
    ), "torch first, so that the test extra finds it installed"

    worker = " ".join(dockerfile_stages()["worker"])
    docker_cpu = re.search(r"\bcpu\) (pip install [^;]*);;", worker).group(1)
    assert CPU_INDEX in docker_cpu and _pin(docker_cpu) == pin
    assert re.search(r"\bcuda\) ;;", worker), "cuda: the worker extra resolves torch from PyPI"

    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if re.match(r"pip install .*torch==", line)]
    assert commands and all(CPU_INDEX in line and _pin(line) == pin for line in commands), commands
    assert "SEPEN_TORCH=cuda" in readme and f"`torch=={pin}`" in readme


def test_bootstrap_refuses_an_unknown_torch_variant_before_it_installs_anything(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap", tmp_path / "scripts" / "bootstrap")
    run = subprocess.run(
        [str(tmp_path / "scripts" / "bootstrap")], env={**os.environ, "SEPEN_TORCH": "gpu"}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "SEPEN_TORCH must be cpu (the default) or cuda, not 'gpu'" in run.stderr
    assert not (tmp_path / ".venv").exists()


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    """A clone has only the repository: a link to a file outside it (or to a missing one) is broken for users."""
    tracked = subprocess.run(["git", "ls-files", "*.md"], capture_output=True, text=True, cwd=ROOT, check=True)
    pages = [ROOT / name for name in tracked.stdout.split()]
    assert pages
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.relative_to(ROOT)} links outside the repository: {target}"
            assert resolved.exists(), f"{page.relative_to(ROOT)} links to a missing file: {target}"
