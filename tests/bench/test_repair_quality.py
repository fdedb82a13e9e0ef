"""The safety-repair section of bench/README.md re-renders byte for byte from
bench/results/repair_quality.json, and its verdicts are computed from the rows."""

from __future__ import annotations

import copy
import importlib
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "bench" / "README.md"


def test_section_renders_from_its_results(tmp_path):
    module = importlib.import_module("bench.repair_quality")
    readme = tmp_path / "README.md"
    shutil.copyfile(README, readme)
    assert module.main(["--render", "--readme", str(readme)]) == 0
    assert readme.read_text() == README.read_text()


def test_the_verdict_follows_the_rows():
    module = importlib.import_module("bench.repair_quality")
    saved = json.loads(module.RESULTS.read_text())
    assert any("not met" in line for line in module.verdicts(saved["rows"], "safety/erased"))
    rows = copy.deepcopy(saved["rows"])
    hit = next(r for r in rows if r["finetune"] == "safety/erased" and r["label"] == "irr keep=0")
    hit.update(refuse=0.95, reverse=0.95)
    lines = module.verdicts(rows, "safety/erased")
    assert any(line.startswith("- **irr**: met: irr keep=0") for line in lines)
