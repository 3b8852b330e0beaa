"""The CIH study package has no import circle (module-level or function-local), and the cih.json
schema imports without torch (the explorer reads it)."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fra" / "ingest" / "studies" / "cih"


def import_graph() -> dict[str, set[str]]:
    """module -> modules of the package that it imports anywhere in its source."""
    g: dict[str, set[str]] = {}
    for path in PKG.glob("*.py"):
        mod = path.stem
        g.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    g[mod].add(node.module.split(".")[0])
                elif node.level == 1:
                    g[mod].update(a.name for a in node.names)
                elif node.module and node.module.startswith("fra.ingest.studies.cih."):
                    g[mod].add(node.module.split(".")[4])
    return g


def test_no_import_circle_in_the_study():
    g = import_graph()
    assert "study" in g["pipeline"] and "measure" in g["study"]  # the graph sees both kinds of import
    graphlib.TopologicalSorter(g).prepare()  # raises CycleError, naming the circle


def test_schema_imports_without_torch_or_the_study():
    code = (
        "import sys; import fra.ingest.studies.cih.schema; "
        "bad = [m for m in ('torch', 'pandas', 'fra.ingest.studies.cih.study') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parents[3])
    assert r.returncode == 0, r.stderr
