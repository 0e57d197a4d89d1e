"""What this installation of sepen holds: its version, and whether the extra a console script needs is installed.

Standard library only, so every entry point can ask before it imports anything an extra brings. The extras'
contents are read from the installed package's own metadata (pyproject.toml's optional-dependencies), not
repeated here.
"""

from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTION = "sepen"
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def version() -> str:
    """The installed distribution's version ('0+unknown' when run from a source tree that was never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def extra_requirements(extra: str, requirements: list[str] | None = None) -> list[str]:
    """The requirements `extra` installs ('name[extras]>=version'), the extras of sepen it includes (`sepen[store]`)
    expanded; `requirements` defaults to the installed package's Requires-Dist."""
    if requirements is None:
        requirements = metadata.requires(DISTRIBUTION) or []
    found: list[str] = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if extra not in _EXTRA_MARKER.findall(marker):
            continue
        name, included = _NAME.match(spec).groups()
        if name.lower() == DISTRIBUTION:
            for part in filter(None, (e.strip() for e in (included or "").split(","))):
                found += [r for r in extra_requirements(part, requirements) if r not in found]
        elif spec.strip() not in found:
            found.append(spec.strip())
    return found


def extra_distributions(extra: str, requirements: list[str] | None = None) -> list[str]:
    """The names of the distributions `extra` installs."""
    names: list[str] = []
    for requirement in extra_requirements(extra, requirements):
        name = _NAME.match(requirement).group(1)
        if name not in names:
            names.append(name)
    return names


def missing(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed; [] when sepen itself is not installed (a source tree)."""
    try:
        wanted = extra_distributions(extra)
    except metadata.PackageNotFoundError:
        return []
    absent = []
    for name in wanted:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
    return absent


def require(command: str, extra: str, *, part: str | None = None) -> None:
    """Exit with one line naming `extra` unless what it installs is there (or only `part`, an extra it includes:
    `sepen-admin` runs wherever the store is, as in the worker image, but is offered with the api extra)."""
    absent = missing(part or extra)
    if absent:
        raise SystemExit(
            f"{command} needs the {extra} extra: pip install 'sepen[{extra}]' (not installed: {', '.join(absent)})"
        )
