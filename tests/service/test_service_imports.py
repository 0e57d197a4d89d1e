"""The gateway's layering: no torch in the API process, no worker import, only the torch-free parts of sepen_core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_CORE = {
    "sepen_core.config",
    "sepen_core.errors",
    "sepen_core.extras",
    "sepen_core.model_card",
    "sepen_core.prompts",
    "sepen_core.export",  # numpy, no torch: imported by the weights route when it converts
}
FORBIDDEN = {"torch", "diffusers", "transformers", "safetensors", "numpy", "PIL", "worker"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_service_imports_only_what_the_architecture_allows():
    files = sorted((ROOT / "service").rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
            if top == "sepen_core":
                assert name in ALLOWED_CORE, (
                    f"{path.relative_to(ROOT)} imports {name}; only {sorted(ALLOWED_CORE)} lack torch"
                )


def test_importing_and_building_the_app_loads_no_torch(tmp_path):
    code = (
        "import sys; from service.app import create_app; from sepen_store.settings import GatewaySettings; "
        f"app = create_app(GatewaySettings(data_dir={str(tmp_path)!r})); app.openapi(); import service.admin; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors', 'numpy', 'worker') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
