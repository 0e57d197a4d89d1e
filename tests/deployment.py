"""Readers of the deployment files for the tests: docker-compose*.yml, the Dockerfile's stages, .env.example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
# `${VAR}`, `${VAR:-default}` (and `${VAR-default}`) as compose substitutes them from the environment or .env.
SUBSTITUTION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())  # the safe loader follows the file's anchors and `<<` merges


def app_services(compose: dict) -> dict[str, dict]:
    """The services built from this repository (not Postgres or Redis), in the file's order."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def substituted(value: str, environment: dict[str, str] | None = None) -> str:
    """`value` with its ${VAR:-default} filled in as compose would, from `environment` (default: none, no .env)."""
    environment = environment or {}
    return SUBSTITUTION.sub(lambda m: environment.get(m.group(1)) or m.group(2) or "", str(value))


def compose_defaults(path: Path) -> dict[str, str]:
    """Each variable the file substitutes -> the value it uses when the variable is unset or empty ('' for none)."""
    return {name: default or "" for name, default in SUBSTITUTION.findall(path.read_text())}


def dockerfile_stages(text: str | None = None) -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    instructions = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for instruction in filter(None, (line.strip() for line in instructions)):
        start = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", instruction, re.I)
        if start:
            current = stages.setdefault(start.group(1), [])
        current.append(instruction)
    return stages


def stage_extras(stage: list[str]) -> list[str]:
    """The extras of the project that a stage installs: `pip install "$(echo /dist/sepen-*.whl)[extra]"` (the wheel)
    or `pip install ".[extra]"` (the source)."""
    pattern = r"""pip install [^&;]*?(?:\.whl\)|["' ]\.)\[(\w+)\]"""
    return [extra for line in stage if line.startswith("RUN") for extra in re.findall(pattern, line)]


def stage_command(stage: list[str]) -> list[str]:
    commands = [json.loads(line.split(None, 1)[1]) for line in stage if line.startswith("CMD")]
    assert len(commands) == 1, stage
    return commands[0]


def env_example() -> dict[str, tuple[str, list[str]]]:
    """VAR -> (its value, the comment lines right above it) for every `VAR=value` line of .env.example."""
    entries: dict[str, tuple[str, list[str]]] = {}
    comments: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comments.append(line)
        elif "=" in line:
            name, value = line.split("=", 1)
            entries[name.strip()] = (value, comments)
            comments = []
        else:
            comments = []
    return entries
