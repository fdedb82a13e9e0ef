"""Compression lab under AppTest: compresses a zoo fine-tune, shows the on-disk ratio, the
per-tensor error and accuracies; a ratio change writes a new artifact."""

from __future__ import annotations

import pytest

@pytest.fixture
def lab(open_page):
    return open_page("pages/compression_lab.py")


def test_compression_lab_measures_bytes_on_disk(lab, tmp_path):
    assert not lab.error
    ratio = next(m.value for m in lab.metric if m.label == "Ratio on disk")
    assert 7.2 <= float(ratio.rstrip("x")) <= 8.8  # the default target, within 10 %
    artifacts = list((tmp_path / "home" / "artifacts").iterdir())
    assert len(artifacts) == 1 and (artifacts[0] / "manifest.json").is_file()
    assert len(lab.get("plotly_chart")) >= 2
    lab.select_slider(key="cl_ratio").set_value(16).run()
    assert not lab.exception and not lab.error
    ratio = next(m.value for m in lab.metric if m.label == "Ratio on disk")
    assert 14.4 <= float(ratio.rstrip("x")) <= 17.6
    assert len(list((tmp_path / "home" / "artifacts").iterdir())) == 2


def test_compression_lab_other_method(lab):
    lab.selectbox(key="cl_method").set_value("svd").run()
    assert not lab.exception and not lab.error


@pytest.mark.parametrize("method", ["impart", "dbms", "delta_dct"])
def test_every_preset_and_the_paper_defaults_run(lab, method):
    """Each method's presets (and its paper defaults) compress from the page: container
    parameters (ImPart's qt_counts, DBMS's inner_params) go through JSON widgets, and the
    preset's values reach the artifact."""
    import json

    from engine import settings
    from engine.compress import get_method

    lab.selectbox(key="cl_method").set_value(method).run()
    assert not lab.exception and not lab.error, [e.value for e in lab.error]
    presets = get_method(method).presets
    assert presets
    for name, values in presets.items():
        lab.radio(key=f"cl_preset.{method}").set_value(name).run()
        assert not lab.exception and not lab.error, (name, [e.value for e in lab.error])
        ratio = next(m.value for m in lab.metric if m.label == "Ratio on disk")
        assert 7.2 <= float(ratio.rstrip("x")) <= 8.8
    # the manifests written record the preset's values
    manifests = [json.loads((d / "manifest.json").read_text())
                 for d in (settings.workbench_home() / "artifacts").iterdir()]
    for values in presets.values():
        assert any(all(m["params"].get(k) == (list(v) if isinstance(v, tuple) else v)
                       for k, v in values.items()) for m in manifests if m["method"] == method)


def test_every_compression_method_runs_with_its_form_defaults(lab):
    """Each compressor, as its pydantic form renders it (paper defaults), compresses a quick-zoo
    fine-tune from the page and meets the ratio on disk within 10%."""
    from engine.compress import list_methods

    failures = {}
    for name in list_methods():
        lab.selectbox(key="cl_method").set_value(name).run(timeout=120)
        if lab.exception or lab.error:
            failures[name] = [e.value for e in lab.exception] + [e.value for e in lab.error]
            continue
        ratio = next(m.value for m in lab.metric if m.label == "Ratio on disk")
        assert 7.2 <= float(ratio.rstrip("x")) <= 8.8, name
    assert not failures, failures
