"""`sepen-worker`'s console entry point: one line naming the worker extra when it is not installed, else worker.main."""

from __future__ import annotations

import sys

from sepen_core.extras import require, version


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # answered without the extra, like the other commands
        print(f"sepen-worker {version()}")
        return 0
    require("sepen-worker", "worker")  # before worker.main imports celery, torch and the store
    from worker.main import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
