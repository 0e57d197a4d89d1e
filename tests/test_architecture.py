"""The layering rules of ARCHITECTURE.md: sepen_core imports nothing of ours, nothing of the web, the
database or the queue, and reads no environment; its config, errors and prompts stay torch-free."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {"fastapi", "starlette", "sqlalchemy", "alembic", "celery", "redis", "kombu", "psycopg", "psycopg2",
                     "service", "worker", "sepen_store", "migrations"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_service_layers_and_reads_no_environment():
    files = sorted((ROOT / "sepen_core").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        bad = imported_modules(path) & FORBIDDEN_IN_CORE
        assert not bad, f"{path.name} imports {bad}"
        source = path.read_text()
        assert "os.environ" not in source and "getenv" not in source, f"{path.name} reads the environment"


def test_gateway_facing_modules_do_not_import_torch():
    code = ("import sys, sepen_core, sepen_core.config, sepen_core.errors, sepen_core.prompts; "
            "sepen_core.ConceptSet; sepen_core.FinetuneConfig; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
