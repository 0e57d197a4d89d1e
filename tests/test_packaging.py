"""The package as shipped: the wheel built from this tree, installed (not editable) into virtual environments
with one extra each, runs docker-compose.yml's migrate, api (and its web page) and worker commands, in compose order and
with compose's environment, against a local Postgres and a private Redis; without its extra, each command names the one
it needs.

The virtual environments' dependencies are kept between runs (SEPEN_TEST_VENVS, default ~/.cache/sepen/test-venvs),
keyed by the requirements that extra brings: a run with the same requirements reinstalls only the wheel, a run
with others builds the environment from nothing. SEPEN_TEST_VENVS=fresh builds every one from nothing. Two test
runs take turns with the kept environments (a lock file there).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from sepen_core.extras import extra_distributions, extra_requirements
from tests.conftest import postgres_database
from tests.deployment import ROOT, app_services, dockerfile_stages, load_compose, stage_extras, substituted
from tests.e2e.conftest import RedisServer, free_port

PACKAGES = ("sepen_core", "sepen_store", "service", "worker", "toyworld")
COMMANDS = {"sepen": "ml", "sepen-admin": "api", "sepen-worker": "worker"}  # console script -> the extra it names
KEPT = os.environ.get("SEPEN_TEST_VENVS") or str(Path.home() / ".cache" / "sepen" / "test-venvs")


def _run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module", autouse=True)
def kept_venvs_to_ourselves():
    """While this module runs, no other test run reinstalls the kept environments under its feet."""
    if KEPT == "fresh":
        yield
        return
    Path(KEPT).mkdir(parents=True, exist_ok=True)
    with open(Path(KEPT) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the files git would ship (tracked or new, not ignored): no stale build/ of this
    tree, no file a clone lacks."""
    src = tmp_path_factory.mktemp("src")
    shipped = ["pyproject.toml", "README.md", "LICENSE", *PACKAGES]
    git = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *shipped]
    listed = _run(git, cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)])
    print(f"\nwheel built in {time.monotonic() - started:.0f}s")
    (built,) = out.glob("sepen-*.whl")
    return built


def _metadata(wheel: Path) -> tuple[list[str], str]:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(name).decode()
    headers = [line.split(": ", 1) for line in text.split("\n\n", 1)[0].splitlines() if ": " in line]
    requires = [value for key, value in headers if key == "Requires-Dist"]
    version = next(value for key, value in headers if key == "Version")
    return requires, version


def _pip(python: Path, *args: str) -> None:
    """This environment's pip acting on another interpreter (whose venv then needs no pip of its own)."""
    _run([sys.executable, "-m", "pip", "--python", str(python), "-q", *args])


def _venv(wheel: Path, extra: str | None, where: Path) -> Path:
    """A virtual environment holding the wheel, installed with `extra` (None: no extra) the way the images do:
    torch's pinned wheel first where the extra brings torch, then `pip install wheel[extra]`."""
    requires, _ = _metadata(wheel)
    wanted = extra_distributions(extra, requires) if extra else []
    torch = [r.split(";")[0].strip() for r in requires if r.startswith("torch==")] if "torch" in wanted else []

    wanted_specs = sorted(extra_requirements(extra, requires)) if extra else []
    key = hashlib.sha256(json.dumps([sys.version, extra, wanted_specs, torch]).encode()).hexdigest()[:16]
    kept = extra is not None and KEPT != "fresh"  # the bare one installs nothing but the wheel: never kept
    path = Path(KEPT) / f"{extra}-{key}" if kept else where / f"venv-{extra or 'bare'}"
    ready = path / ".dependencies-installed"
    python = path / "bin" / "python"
    started = time.monotonic()
    if ready.exists():
        _pip(python, "uninstall", "-y", "sepen")  # then the install below is a fresh one of this wheel
    else:
        for old in Path(KEPT).glob(f"{extra}-*") if kept else []:
            shutil.rmtree(old)  # built for other requirements (or half-built): one environment per extra is kept
        _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
        if torch:
            _pip(python, "install", "--no-compile", *torch)  # no .pyc now: imports write theirs (a minute saved)
    _pip(python, "install", "--no-compile", f"{wheel}[{extra}]" if extra else str(wheel))
    if kept:
        ready.touch()
    print(f"{path.name}: ready in {time.monotonic() - started:.0f}s")
    return path


def _env(venv: Path, **settings: str) -> dict[str, str]:
    """The process environment of a container: its venv first on PATH, the given SEPEN_* settings and no others."""
    dropped = ("SEPEN_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv), OMP_NUM_THREADS="1")
    env.update(settings)
    return env


def _executable(venv: Path, command: list[str]) -> list[str]:
    found = shutil.which(command[0], path=str(venv / "bin"))
    assert found, f"{command[0]} is not installed in {venv.name}"
    return [found, *command[1:]]


def _wait(check, timeout: float, what: str):
    """Poll `check` until it returns something; connection errors are retried, a failed assertion is not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_wheel_carries_the_migrations_the_typing_markers_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    source = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sepen_store" / "migrations").rglob("*.py"))
    assert source and set(source) <= names
    assert "sepen_store/migrations/script.py.mako" in names
    assert not any(name.startswith(("migrations/", "alembic.ini")) for name in names)
    assert {f"{package}/py.typed" for package in PACKAGES} <= names
    assert "sepen_core/bundled/sepen-toy/model_index.json" in names
    page = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "service" / "web").iterdir())
    assert "service/web/index.html" in page and "service/web/app.js" in page and set(page) <= names, "the web page"
    requires, _ = _metadata(wheel)
    assert all("extra ==" in r for r in requires), "every dependency belongs to an extra"
    for extra in ("api", "store"):
        assert "torch" not in extra_distributions(extra, requires), extra
    for extra in ("ml", "worker", "all"):
        assert "torch" in extra_distributions(extra, requires), extra
    assert {"fastapi", "uvicorn", "psycopg", "alembic", "boto3"} <= set(extra_distributions("api", requires))
    assert "boto3" in extra_distributions("worker", requires)  # the workers read and write the bucket too
    assert {"celery", "diffusers", "transformers"} <= set(extra_distributions("worker", requires))
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"sepen-{_metadata(wheel)[1]}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata


def test_each_command_without_its_extra_names_it_in_one_line(wheel, tmp_path):
    venv = _venv(wheel, None, tmp_path)
    version = _metadata(wheel)[1]
    env = _env(venv)
    for command, extra in COMMANDS.items():
        shown = _run([*_executable(venv, [command]), "--version"], env=env, cwd=tmp_path).stdout.strip()
        assert shown == f"{command} {version}"
        args = {"sepen": ["export-tiny-model", "out"], "sepen-admin": ["migrate"], "sepen-worker": []}[command]
        run = subprocess.run(
            _executable(venv, [command, *args]), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"{command} needs the {extra} extra: pip install 'sepen[{extra}]'"
        )
    assert not (tmp_path / "out").exists()


def test_compose_services_run_from_the_installed_wheel(wheel, tmp_path, request):
    """migrate, api, worker as docker-compose.yml runs them, each in a venv with its image's extra."""
    compose = load_compose()
    services = app_services(compose)
    assert list(services) == ["migrate", "api", "worker"]
    stages = dockerfile_stages()
    extras = {name: stage_extras(stages[service["build"]["target"]]) for name, service in services.items()}
    assert extras == {"migrate": ["api"], "api": ["api"], "worker": ["worker"]}
    venvs = {extra: _venv(wheel, extra, tmp_path) for extra in ("api", "worker")}
    if KEPT == "fresh":  # 1.5 GB that pytest would keep in its last three temporary directories
        request.addfinalizer(lambda: [shutil.rmtree(venv) for venv in venvs.values()])
    workdir = tmp_path / "app"  # a working directory without the source tree, as in the images
    workdir.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()

    api_venv = venvs["api"]
    probe = "import importlib.util as u, service; print(service.__file__, u.find_spec('torch') is None)"
    where, no_torch = _run([str(api_venv / "bin" / "python"), "-c", probe], cwd=workdir).stdout.split()
    assert Path(where).is_relative_to(api_venv) and no_torch == "True", "the api extra must not bring torch"
    refused = subprocess.run(
        _executable(api_venv, ["sepen-worker"]), env=_env(api_venv), capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "pip install 'sepen[worker]'" in refused.stderr

    with ExitStack() as stack:
        database = stack.enter_context(postgres_database("sepen_packaging", migrate=False))
        redis = RedisServer(tmp_path)
        redis.start()
        stack.callback(redis.stop)
        processes: list[subprocess.Popen] = []

        def stop_all() -> None:
            for proc in processes:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()

        stack.callback(stop_all)

        def environment(name: str) -> dict[str, str]:
            """The service's compose environment (no .env), with the local servers for compose's own."""
            settings = {key: substituted(value) for key, value in services[name]["environment"].items()}
            assert settings["SEPEN_DATABASE_URL"].startswith("postgresql+psycopg://")
            assert settings["SEPEN_BROKER_URL"].startswith("redis://")
            settings.update(SEPEN_DATABASE_URL=database, SEPEN_BROKER_URL=redis.url)
            return _env(venvs[extras[name][0]], **settings)

        def start(name: str, command: list[str]) -> subprocess.Popen:
            log = (logs / f"{name}.log").open("w")
            proc = subprocess.Popen(command, env=environment(name), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
            processes.append(proc)
            return proc

        def log_of(name: str) -> str:
            return (logs / f"{name}.log").read_text()[-4000:]

        # migrate: the one-shot service, to completion.
        started = time.monotonic()
        migrate = services["migrate"]["command"]
        _run(_executable(venvs["api"], migrate), env=environment("migrate"), cwd=workdir, timeout=120)
        from alembic.script import ScriptDirectory

        from sepen_store.database import alembic_config, make_engine

        engine = make_engine(database)
        with engine.connect() as connection:
            head = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        engine.dispose()
        assert head == ScriptDirectory.from_config(alembic_config(database)).get_current_head()

        # api: the gateway on a free loopback port instead of compose's 0.0.0.0:8000.
        command = [substituted(part) for part in services["api"]["command"]]  # --workers ${SEPEN_GATEWAY_WORKERS:-1}
        assert command[command.index("--port") + 1] == services["api"]["ports"][0].split(":")[-1]
        port = free_port()
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        gateway = start("api", _executable(venvs["api"], command))
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert gateway.poll() is None, f"the gateway exited:\n{log_of('api')}"
            return httpx.get(f"{base}/readyz", timeout=3).status_code == 200

        _wait(ready, 60, "the gateway to be ready")
        print(f"migrated and gateway ready in {time.monotonic() - started:.0f}s")

        # A key, as the README says: `docker compose exec api sepen-admin create-key --tenant me`.
        created = _run(
            _executable(venvs["api"], ["sepen-admin", "create-key", "--tenant", "packaging"]),
            env=environment("api"),
            cwd=workdir,
            timeout=120,
        )
        key = created.stdout.strip().splitlines()[-1]
        client = stack.enter_context(
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        )
        # The web page, from the installed package's files (no source tree here).
        served = httpx.get(f"{base}/", timeout=10)
        assert served.status_code == 200 and '<script type="module" src="/web/app.js">' in served.text
        assert httpx.get(f"{base}/web/app.js", timeout=10).status_code == 200
        models = client.get("/models")
        assert models.status_code == 200, models.text
        assert "sepen-tiny" in models.text and "sepen-toy" in models.text
        submitted = client.post(
            "/generate", json={"prompt": "a photo of a cat and a dog", "model": "sepen-tiny", "steps": 2, "seed": 3}
        )
        assert submitted.status_code == 202, submitted.text
        job_url = submitted.json()["links"]["self"]
        assert client.get(job_url).json()["status"] == "queued"

        # worker: completes the queued job.
        started = time.monotonic()
        worker = start("worker", _executable(venvs["worker"], services["worker"]["command"]))

        def finished() -> dict | None:
            assert worker.poll() is None, f"the worker exited:\n{log_of('worker')}"
            job = client.get(job_url).json()
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job = _wait(finished, 240, "the worker to finish the job")
        assert job["status"] == "succeeded", f"{job}\n{log_of('worker')}"
        print(f"worker started and finished the job in {time.monotonic() - started:.0f}s")
        image = client.get(job["result"]["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG"), image.text[:200]
