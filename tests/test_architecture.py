"""The layering rules of ARCHITECTURE.md: sepen_core imports nothing of ours, nothing of the web, the
database or the queue, and reads no environment; its config, errors and prompts stay torch-free, and so do export
and adapter_file (the gateway converts adapters with them) and images."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "celery",
    "redis",
    "kombu",
    "psycopg",
    "psycopg2",
    "service",
    "worker",
    "sepen_store",
}


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
    code = (
        "import sys, sepen_core, sepen_core.config, sepen_core.errors, sepen_core.model_card, sepen_core.prompts, "
        "sepen_core.export, sepen_core.adapter_file, sepen_core.images; "
        "sepen_core.ConceptSet; sepen_core.FinetuneConfig; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


SESSION_WRITES = {"execute", "add", "add_all", "delete", "query", "scalar", "scalars", "get", "merge", "flush"}


def test_only_sepen_store_touches_tables():
    """The gateway and the worker go through sepen_store's functions: no queries, no row writes of their own.
    They may hold a Session, an Engine or a Connection (to pass it on) and read attributes of the rows sepen_store
    returns."""
    may_hold = {"sqlalchemy.orm": {"Session", "sessionmaker"}, "sqlalchemy.engine": {"Engine", "Connection"}}
    files = [p for package in ("service", "worker") for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 15
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqlalchemy":
                names = {alias.name for alias in node.names}
                assert names <= may_hold.get(node.module, set()), (
                    f"{path.relative_to(ROOT)} imports {names} from {node.module}"
                )
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SESSION_WRITES:
                owner = node.func.value
                assert not (isinstance(owner, ast.Name) and owner.id in ("session", "db", "connection")), (
                    f"{path.relative_to(ROOT)}:{node.lineno} calls session.{node.func.attr}; add a sepen_store function"
                )
