"""reliability.md item 26: no torch.load without weights_only=True, no trust_remote_code=True,
no pickle.load(s), anywhere in the shipped code (engine/, cache/, pages/, app.py). Every
transformers loader call (``*.from_pretrained``, ``Auto*.*``, ``pipeline``) passes
``trust_remote_code=False`` literally: leaving it out leaves the choice to transformers (which
asks on stdin, and a "y" runs the folder's Python file).

The check parses the code (ast), so multi-line calls and aliases like ``from torch import load``
are seen, and mentions in strings or comments are not mistaken for calls.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["engine", "cache", "pages", "app.py"]


def shipped_python_files() -> list[Path]:
    files = []
    for entry in SHIPPED:
        path = REPO_ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("*.py")))
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


# Auto* class methods that read no folder and take no trust_remote_code: for_model maps a
# model_type to a built-in config class, register adds an in-process class.
AUTO_METHODS_WITHOUT_FOLDER = {"for_model", "register"}


def _is_transformers_loader(full: str) -> bool:
    parts = full.split(".")
    if parts[-1] == "from_pretrained" or full in ("pipeline", "transformers.pipeline"):
        return True
    return (len(parts) >= 2 and parts[-2].startswith("Auto")
            and parts[-1] not in AUTO_METHODS_WITHOUT_FOLDER)


def resolved_calls(tree: ast.AST):
    """(call node, dotted name of what it calls, import aliases resolved) for every call."""
    aliases = {}  # local name -> dotted origin, from imports
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        yield node, f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every forbidden loading call in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    found = []
    for node, full in resolved_calls(tree):
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if full == "torch.load":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        if full in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads"):
            found.append(f"{filename}:{node.lineno}: {full}")
        value = keywords.get("trust_remote_code")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            found.append(f"{filename}:{node.lineno}: trust_remote_code not literally False")
        elif value is None and _is_transformers_loader(full):
            found.append(f"{filename}:{node.lineno}: {full} without trust_remote_code=False")
    for node in ast.walk(tree):  # {"trust_remote_code": True} built as a dict for **kwargs
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value == "trust_remote_code"
                        and not (isinstance(value, ast.Constant) and value.value is False)):
                    found.append(f"{filename}:{node.lineno}: trust_remote_code in a dict")
    return found


def test_the_checker_catches_a_loader_that_leaves_trust_remote_code_out():
    bad = """
import transformers
from transformers import AutoTokenizer, AutoConfig as AC, pipeline
AutoTokenizer.from_pretrained(p, local_files_only=True)
AC.from_pretrained(p)
transformers.AutoModelForCausalLM.from_config(cfg)
transformers.GenerationConfig.from_pretrained(p)
pipeline("text-generation", model=p)
AutoTokenizer.from_pretrained(p, **options)
"""
    found = violations(bad)
    assert len(found) == 6, found
    assert all("without trust_remote_code=False" in f for f in found)
    good = """
from transformers import AutoTokenizer, AutoConfig, AutoModelForCausalLM, pipeline
AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
pipeline("text-generation", model=p, trust_remote_code=False)
AutoConfig.for_model("llama", hidden_size=8)
tokenizer.save_pretrained(p)
"""
    assert violations(good) == []


def test_the_checker_catches_what_it_should():
    bad = """
import torch
import pickle as pk
from torch import load as tl
from transformers import AutoModel
torch.load(p)
torch.load(p,
           weights_only=False)
tl(p, map_location="cpu")
pk.loads(b"")
AutoModel.from_pretrained(p, trust_remote_code=True)
AutoModel.from_pretrained(p, **{"trust_remote_code": True})
"""
    assert len(violations(bad)) == 7  # the **{...} call counts twice: the dict, and no keyword
    good = """
import torch
torch.load(p, map_location="cpu", weights_only=True)
AutoModel.from_pretrained(p, trust_remote_code=False)
x = "torch.load(p) trust_remote_code=True"  # text, not calls
"""
    assert violations(good) == []


@pytest.mark.parametrize("path", shipped_python_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_code_never_unpickles_or_trusts_remote_code(path):
    assert violations(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT))) == []


def test_the_check_sees_every_shipped_module_and_real_loader_calls():
    """The per-file check above passes vacuously on a listing that misses code: every module
    the import system finds in the shipped packages is listed, and the listed code holds the
    loader calls the rules are about (the weights-only torch.load of convert-pickle, the
    transformers loaders), each of which the checker sees and finds clean."""
    import pkgutil

    import cache
    import engine
    import pages

    listed = set(shipped_python_files())
    assert REPO_ROOT / "app.py" in listed
    for package in (engine, cache, pages):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            spec = info.module_finder.find_spec(info.name.rsplit(".", 1)[-1])
            assert Path(spec.origin) in listed, info.name
    calls = [full for path in listed for _, full in resolved_calls(ast.parse(path.read_text(encoding="utf-8")))]
    assert calls.count("torch.load") >= 1
    assert sum(_is_transformers_loader(full) for full in calls) >= 3
