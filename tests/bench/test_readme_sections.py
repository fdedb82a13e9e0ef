"""Every bench section of bench/README.md is rendered from the raw numbers committed in
bench/results/: re-rendering a section from its results file (the bench's ``--render``, which
measures nothing) leaves the README byte for byte as it is. A hand edit of a table, or a results
file that no longer matches its section, fails here."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "bench" / "README.md"
RESULTS = REPO / "bench" / "results"

# bench module -> the results files its section is rendered from
RENDERED = {
    "analysis_bench": ["analysis.json"],
    "whatif_speed": ["whatif_speed.json"],
    "page_render": ["page_render_full.json"],
    "compress_serving": ["compress_serving.json"],
    "merge_speed": ["merge_speed.json", "merge_speed_newer.json", "merge_speed_other.json", "merge_speed_1b.json"],
    "mergekit_parity": ["mergekit_parity.json"],
    "moe_parity": ["moe_parity.json"],
    "moe_zoo_demo": ["moe_zoo_demo.json"],
    "repair_quality": ["repair_quality.json"],
    "transfer": ["transfer.json"],
    "visionfuse": ["visionfuse.json"],
    "tune": ["tune.json"],
}


@pytest.fixture
def readme_copy(tmp_path, monkeypatch):
    from bench import _common

    copy = tmp_path / "README.md"
    shutil.copyfile(README, copy)
    monkeypatch.setattr(_common, "README", copy)
    return copy


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_section_renders_from_its_results_file(name, readme_copy):
    for results in RENDERED[name]:
        assert (RESULTS / results).is_file(), f"bench/results/{results} is missing"
    module = importlib.import_module(f"bench.{name}")
    argv = ["--render"] + (["--readme", str(readme_copy)] if name in ("compress_serving", "repair_quality") else [])
    assert module.main(argv) == 0
    assert readme_copy.read_text() == README.read_text(), f"{name}: the README section differs from its results"


def test_lora_section_renders_from_its_record():
    module = importlib.import_module("bench.lora_vs_merged")
    record = json.loads((RESULTS / "lora_vs_merged.json").read_text())
    text = README.read_text()
    start, end = "<!-- lora-vs-merged:start -->\n", "\n<!-- lora-vs-merged:end -->"
    assert text.split(start, 1)[1].split(end, 1)[0] == module.render(record).rstrip()


def test_a_changed_number_is_caught(readme_copy, tmp_path, monkeypatch):
    """The check above can fail: a results file with one number changed renders another section."""
    from bench import _common

    module = importlib.import_module("bench.merge_speed")
    record = json.loads((RESULTS / "merge_speed.json").read_text())
    record["rows"][0]["wall_s_median"] += 1.0
    changed = tmp_path / "merge_speed.json"
    changed.write_text(json.dumps(record))
    monkeypatch.setattr(module, "RESULTS", changed)
    assert module.main(["--render"]) == 0
    assert readme_copy.read_text() != README.read_text()
    assert _common.README == readme_copy
