"""The layering, checked on the code (ast, so imports inside functions count too):

* the engine and the cache know nothing of Streamlit or the pages;
* pages and app.py know nothing of tensors (no torch, numpy tensors stay in the engine);
* evaluation imports nothing from the zoo (the zoo trains with the evaluator's tokenizer and
  tasks; an arrow back up would make every evaluation import the zoo's training code).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _files(*entries: str) -> list[Path]:
    files = []
    for entry in entries:
        path = REPO / entry
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    assert files, entries
    return files


RULES = [
    (("engine", "cache"), ("streamlit", "pages", "app")),
    (("pages", "app.py"), ("torch", "safetensors")),
    (("engine/evaluate",), ("engine.zoo",)),
]


@pytest.mark.parametrize("sources,forbidden", RULES, ids=lambda v: "+".join(v))
def test_no_import_crosses_a_layer(sources, forbidden):
    crossing = []
    for path in _files(*sources):
        for module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                crossing.append(f"{path.relative_to(REPO)} imports {module}")
    assert not crossing, "; ".join(crossing)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from engine.zoo import build_zoo\n    import torch.nn\n")
    assert _imports(probe) == {"engine.zoo", "torch.nn"}
