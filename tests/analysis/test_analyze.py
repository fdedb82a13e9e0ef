"""analyze(): every tensor and pair against references, with and without the cache."""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np
import pytest

from cache import MetricStore
from engine.analysis import AnalysisParams, analyze
from engine.analysis.spectra import SpectrumParams
from tests.analysis.helpers import (CONFIG, base_tensors, finetune_tensors, make_family, np64,
                                    ref_singular_values)
from tests.io.builders import write_model


@pytest.fixture()
def family(tmp_path):
    return make_family(tmp_path / "models", n_finetunes=3)


def _strip(result):
    """The parts of a result that must not depend on caching."""
    return {k: result[k] for k in ("tensors", "pairs", "models")}


def test_results_match_references_without_cache(family):
    base_dir, ft_dirs, base, fts = family
    result = analyze(base_dir, ft_dirs, AnalysisParams(spectrum=SpectrumParams(top_k=5)))
    names = sorted(base)
    assert sorted({t["name"] for t in result["tensors"]}) == names
    assert len(result["tensors"]) == 3 * len(names)
    assert len(result["pairs"]) == 3 * len(names)  # (0,1), (0,2), (1,2) per tensor
    assert result["cache"]["status"] == "off" and result["cache"]["hits"] == 0
    for t in result["tensors"]:
        d = np64(fts[t["model"]][t["name"]]) - np64(base[t["name"]])
        assert t["fro_norm"] == pytest.approx(float(np.linalg.norm(d)), rel=1e-6)
        if d.ndim == 2:
            np.testing.assert_allclose(t["top_singular_values"], ref_singular_values(d)[:5], rtol=1e-5)
    # whole-model cosine equals the cosine of the concatenated task vectors
    flat = [np.concatenate([(np64(ft[n]) - np64(base[n])).ravel() for n in names]) for ft in fts]
    for i in range(3):
        for j in range(3):
            expected = flat[i] @ flat[j] / math.sqrt((flat[i] @ flat[i]) * (flat[j] @ flat[j]))
            assert result["models"]["cosine"][i][j] == pytest.approx(expected, rel=1e-6)
    assert {(p["a"], p["b"]) for p in result["models"]["pairs"]} == {(0, 1), (0, 2), (1, 2)}


def test_second_call_reads_the_cache(family, tmp_path):
    base_dir, ft_dirs, _, _ = family
    with MetricStore(tmp_path / "c.duckdb") as store:
        first = analyze(base_dir, ft_dirs, cache=store)
        assert first["cache"]["hits"] == 0 and first["cache"]["written"] == first["cache"]["misses"] > 0
        second = analyze(base_dir, ft_dirs, cache=store)
        assert second["cache"]["misses"] == 0 and second["cache"]["hits"] == first["cache"]["misses"]
        assert _strip(second) == _strip(first)
        # other parameters are other keys
        third = analyze(base_dir, ft_dirs, AnalysisParams(spectrum=SpectrumParams(top_k=3)), cache=store)
        assert third["cache"]["hits"] == 0 and len(third["tensors"][0]["top_singular_values"]) == 3
    uncached = analyze(base_dir, ft_dirs)
    assert _strip(uncached) == _strip(first)


def test_a_changed_file_is_a_miss(family, tmp_path):
    base_dir, ft_dirs, _, _ = family
    with MetricStore(tmp_path / "c.duckdb") as store:
        first = analyze(base_dir, ft_dirs[:2], cache=store)
        shard = ft_dirs[1] / "model.safetensors"
        later = time.time() + 5
        os.utime(shard, (later, later))  # touched: same bytes, new mtime -> new fingerprint
        second = analyze(base_dir, ft_dirs[:2], cache=store)
        n = len(first["tensors"]) // 2
        # model 0's per-tensor rows are hits; model 1's rows and every pair are recomputed
        assert second["cache"]["hits"] == n and second["cache"]["misses"] == 2 * n
        assert _strip(second) == _strip(first)
        # rewritten with other values: recomputed, and the new values are reported
        shutil.rmtree(ft_dirs[1])
        write_model(ft_dirs[1], finetune_tensors(base_tensors(), seed=999), config=dict(CONFIG))
        third = analyze(base_dir, ft_dirs[:2], cache=store)
        assert third["cache"]["hits"] == n
        assert [t["fro_norm"] for t in third["tensors"] if t["model"] == 1] != \
               [t["fro_norm"] for t in first["tensors"] if t["model"] == 1]
        assert _strip(third) == _strip(analyze(base_dir, ft_dirs[:2]))


def test_adding_a_finetune_reuses_the_rows_it_can(family, tmp_path):
    base_dir, ft_dirs, _, _ = family
    with MetricStore(tmp_path / "c.duckdb") as store:
        analyze(base_dir, ft_dirs[:2], cache=store)
        grown = analyze(base_dir, ft_dirs, cache=store)
    n = len(grown["tensors"]) // 3
    assert grown["cache"]["hits"] == 3 * n  # two models' rows and the (0, 1) pair rows
    assert _strip(grown) == _strip(analyze(base_dir, ft_dirs))


def test_disabled_store_computes_the_same(family, tmp_path):
    base_dir, ft_dirs, _, _ = family
    (tmp_path / "ro").mkdir()
    store = MetricStore(tmp_path / "ro" / "missing.duckdb", read_only=True)  # nothing to read
    assert not store.enabled and store.warning
    result = analyze(base_dir, ft_dirs[:1], cache=store)
    assert result["cache"]["written"] == 0 and result["pairs"] == []
    assert any("without the cache" in w for w in result["warnings"])


def test_one_tensor_spectrum_for_click_through(family):
    from engine.analysis import tensor_spectrum

    base_dir, ft_dirs, base, fts = family
    name = "model.layers.1.mlp.up_proj.weight"
    out = tensor_spectrum(base_dir, ft_dirs[0], name)
    d = np64(fts[0][name]) - np64(base[name])
    s = ref_singular_values(d)
    assert out["method"] == "exact" and len(out["values"]) == len(s)
    np.testing.assert_allclose(out["values"], s, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["cumulative_energy"], np.cumsum(s ** 2) / np.sum(s ** 2), rtol=1e-6)
    vector = tensor_spectrum(base_dir, ft_dirs[0], "model.norm.weight")
    assert vector["values"] is None and vector["fro_norm"] > 0
