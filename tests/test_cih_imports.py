"""The CIH study package has no import circle (module-level or function-local), and the cih.json
schema imports without torch (the explorer reads it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parent.parent / "fra" / "ingest" / "studies" / "cih"


def import_graph() -> nx.DiGraph:
    """module -> module of the package that it imports anywhere in its source."""
    g = nx.DiGraph()
    for path in PKG.glob("*.py"):
        mod = path.stem
        g.add_node(mod)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    g.add_edge(mod, node.module.split(".")[0])
                elif node.level == 1:
                    for a in node.names:
                        g.add_edge(mod, a.name)
                elif node.module and node.module.startswith("fra.ingest.studies.cih."):
                    g.add_edge(mod, node.module.split(".")[4])
    return g


def test_no_import_circle_in_the_study():
    g = import_graph()
    assert g.has_edge("pipeline", "study") and g.has_edge("study", "measure")  # the graph sees both kinds
    assert list(nx.simple_cycles(g)) == []


def test_schema_imports_without_torch_or_the_study():
    code = (
        "import sys; import fra.ingest.studies.cih.schema; "
        "bad = [m for m in ('torch', 'pandas', 'fra.ingest.studies.cih.study') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parents[3])
    assert r.returncode == 0, r.stderr
