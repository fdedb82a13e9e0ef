"""Every compressor: target ratio met on disk, and the rebuilt delta against a plain reference.

Synthetic pair: 384x256, 256x256 and 512x256 matrices whose deltas are low rank plus noise,
and two 1-D tensors. References are written here in NumPy/SciPy (float64), independently of
the engine's code paths, except the seeded masks (their generator has its own test).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from engine.compress import compress, rebuild_state_dict
from engine.compress.bits import SectionReader
from engine.compress.masks import derive_seed, keep_positions
from engine.compress.methods import impart as impart_module
from engine.compress.pipeline import decode_section, is_matrix, open_checked
from engine.errors import ParameterError
from engine.io import ModelFolder
from tests.compress.helpers import fp16, folder_size, make_pair, matrices, rel_err

RATIOS = (8, 32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base, ft, base_t, ft_t = make_pair(root)
    return {"base": base, "ft": ft, "base_t": base_t, "ft_t": ft_t, "root": root,
            "delta": {n: (ft_t[n] - base_t[n]).numpy().astype(np.float64) for n in matrices(ft_t)},
            "delta32": {n: (ft_t[n] - base_t[n]) for n in ft_t}}


_CACHE: dict = {}


def run(pair, method, ratio=None, params=None):
    key = (method, ratio, repr(params))
    if key not in _CACHE:
        out = pair["root"] / f"{method}-{ratio}-{len(_CACHE)}"
        result = compress(pair["base"], pair["ft"], out, method, ratio=ratio, params=params, device="cpu")
        _CACHE[key] = (out, result)
    return _CACHE[key]


def decoded(art, base_path):
    """{matrix name: (rebuilt delta as float64 array, raw section bytes)}."""
    base = ModelFolder(base_path)
    artifact, spec, params = open_checked(art, base)
    out, index = {}, 0
    for name in base.tensor_names:
        shape = tuple(base.info(name).shape)
        if is_matrix(shape):
            data = artifact.section(index)
            out[name] = (decode_section(spec, params, data, name, shape, index, "cpu").double().numpy(), data)
            index += 1
    return out


def check_ratio(art, result, target):
    size = folder_size(art)
    assert size == result.bytes
    achieved = 2 * result.delta_entries / size
    assert abs(achieved / target - 1) <= 0.10, (achieved, target)
    assert result.delta_entries == 384 * 256 + 256 * 256 + 512 * 256 + 2 * 256


def check_vectors_and_base(pair, art):
    """1-D tensors come back at fp16 precision of their delta; the rebuild adds the base."""
    rebuilt = rebuild_state_dict(art, pair["base"], device="cpu")
    for name, t in pair["ft_t"].items():
        if t.ndim == 1:
            expected = pair["base_t"][name] + torch.from_numpy(fp16(pair["delta32"][name].numpy())).float()
            assert torch.allclose(rebuilt[name], expected, atol=1e-7)
    return rebuilt


@pytest.mark.parametrize("ratio", RATIOS)
def test_magnitude_is_numpy_top_k(pair, ratio):
    art, result = run(pair, "magnitude", ratio)
    check_ratio(art, result, ratio)
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        d = pair["delta"][name].reshape(-1)
        k = result.tensors[name]["kept"]
        keep = np.argsort(-np.abs(d), kind="stable")[:k]
        kth = np.abs(d[keep[-1]])
        kept = np.flatnonzero(d_hat.reshape(-1) != 0)
        # a top-k set (ties at the k-th magnitude may go either way), values in fp16
        assert len(kept) == k and np.abs(d[kept]).min() == kth
        assert (np.abs(np.delete(d, kept)) <= kth).all()
        assert np.array_equal(d_hat.reshape(-1)[kept], fp16(d[kept]))
    check_vectors_and_base(pair, art)


@pytest.mark.parametrize("ratio", RATIOS)
def test_dare_keeps_a_seeded_subset_rescaled(pair, ratio):
    art, result = run(pair, "dare", ratio, {"seed": 3})
    check_ratio(art, result, ratio)
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        d = pair["delta"][name].reshape(-1)
        n, k = d.size, result.tensors[name]["kept"]
        pos = keep_positions(derive_seed(3, name), n, k)
        ref = np.zeros_like(d)
        ref[pos] = fp16(d[pos]) * (n / k)
        assert np.allclose(d_hat.reshape(-1), ref, rtol=1e-6, atol=0)
        assert abs(ref.sum() - d.sum()) < 6 * np.sqrt(n / k * (d ** 2).sum())  # unbiased, roughly


@pytest.mark.parametrize("ratio", RATIOS)
def test_svd_is_the_truncated_svd(pair, ratio):
    art, result = run(pair, "svd", ratio)
    check_ratio(art, result, ratio)
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        d = pair["delta"][name]
        r = result.tensors[name]["rank"]
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        ref = (u[:, :r] * s[:r]) @ vt[:r]
        assert np.linalg.norm(d_hat - ref) <= 2e-3 * np.linalg.norm(ref)


@pytest.mark.parametrize("ratio", (8, 16, 32))
def test_bitdelta_is_sign_times_mean_abs(pair, ratio):
    # stage 1 (scale = mean |d|); the distilled default is tested on the zoo (test_cli_zoo)
    art, result = run(pair, "bitdelta", ratio, {"distill": False})
    check_ratio(art, result, ratio)
    if ratio == 16:  # BitDelta proper: one plane everywhere
        assert {t["planes"] for t in result.tensors.values()} == {1}
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        planes = result.tensors[name].get("planes", 0)
        residual = pair["delta"][name].astype(np.float32).astype(np.float64).copy()
        ref = np.zeros_like(residual)
        for _ in range(planes):
            alpha = float(np.float16(np.abs(residual).mean(dtype=np.float32)))
            step = np.where(residual >= 0, alpha, -alpha)
            ref += step
            residual -= step
        assert np.allclose(d_hat, ref, atol=1e-6), name


@pytest.mark.parametrize("ratio", RATIOS)
def test_delta_come_beats_nothing_and_stays_near_truncation(pair, ratio):
    art, result = run(pair, "delta_come", ratio)
    check_ratio(art, result, ratio)
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        d = pair["delta"][name]
        info = result.tensors[name]
        r = info["n8"] + info["n3"] + info["n2"]
        assert info["n8"] == min(2, r) and r <= min(d.shape)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        trunc = np.linalg.norm(d - (u[:, :r] * s[:r]) @ vt[:r]) ** 2
        err = np.linalg.norm(d - d_hat) ** 2
        assert trunc * 0.999 <= err <= trunc + 0.15 * np.linalg.norm(d) ** 2


def impart_reference_ratios(singular_values, alpha, beta, C):
    """Algorithm 1 of ImPart written plainly with Python lists (after the authors' code)."""
    s = [v ** C for v in singular_values]
    n = len(s)
    s = s[:int(n * (1 - beta))]
    s_max = max(s)
    gamma = (alpha - beta) / (1 - beta)
    ratios = [(1 - v / s_max) * gamma for v in s]
    i = len(ratios) - 1
    while sum(ratios) / len(ratios) < gamma:
        ratios[i] = 1
        i -= 1
    return ratios[:i + 1]


@pytest.mark.parametrize("alpha,beta,C", [(0.97, 0.8, 0.5), (0.9, 0.6, 1.0), (0.75, 0.5, 1.0), (0.99, 0.9, 0.5)])
def test_impart_sparsity_ratios_follow_algorithm_1(alpha, beta, C):
    s = np.sort(np.abs(np.random.default_rng(1).standard_normal(200)) ** 2)[::-1]
    ours = impart_module.sparsity_ratios(s, alpha, beta, C)
    ref = impart_reference_ratios(list(s), alpha, beta, C)
    assert np.allclose(ours, ref)
    assert abs((sum(ref) + (200 - len(ref))) / 200 - alpha) < 0.02  # meets the target sparsity


@pytest.mark.parametrize("ratio", RATIOS)
def test_impart_rebuild_matches_reference(pair, ratio):
    art, result = run(pair, "impart", ratio, {"seed": 5})  # fp16 values (ImPart proper)
    check_ratio(art, result, ratio)
    errors = {}
    for name, (d_hat, data) in decoded(art, pair["base"]).items():
        d = pair["delta"][name]
        m, n = d.shape
        reader = SectionReader(data)
        r = reader.uint(2 if min(m, n) > 255 else 1)
        counts = [(reader.uint(2), reader.uint(2)) for _ in range(r)]
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        ref = np.zeros_like(d)
        tensor_seed = derive_seed(5, name)
        for i, (ku, kv) in enumerate(counts):
            mu = np.zeros(m)
            mv = np.zeros(n)
            pu = keep_positions(derive_seed(tensor_seed, i, "u"), m, ku)
            pv = keep_positions(derive_seed(tensor_seed, i, "v"), n, kv)
            mu[pu] = u[pu, i] * s[i] * m / ku
            mv[pv] = vt[i, pv] * n / kv
            ref += np.outer(mu, mv)
        # kept counts grow with the singular value (importance-aware), the first is dense
        ku_list = [c[0] for c in counts]
        assert ku_list[0] == m and all(a >= b for a, b in zip(ku_list, ku_list[1:]))
        assert np.linalg.norm(d_hat - ref) <= 5e-3 * np.linalg.norm(d)
        errors[name] = np.linalg.norm(d - d_hat) / np.linalg.norm(d)
    assert max(errors.values()) < 1.0


def _dct_reference_decode(data, shape, rescaled=False):
    """Decode a delta_dct section with NumPy/SciPy only (format in the module docstring)."""
    m, n = shape
    reader = SectionReader(data)
    p, map_width = reader.uint(1), reader.uint(1)
    gm, gn = -(-m // p), -(-n // p)
    widths = reader.codes(gm * gn, map_width)
    scale = float(reader.f16(1)[0]) if rescaled else 1.0
    coded = np.flatnonzero(widths > 0)
    steps = np.zeros(gm * gn)
    steps[coded] = reader.f16(coded.size)
    coeffs = np.zeros((gm * gn, p * p))
    for w in sorted(set(widths[coded].tolist())):
        idx = np.flatnonzero(widths == w)
        q = reader.codes(idx.size * p * p, w).reshape(idx.size, p * p)
        coeffs[idx] = (q - (2 ** w - 1) / 2) * steps[idx, None] * scale
    reader.done()
    full = np.zeros((gm * p, gn * p))
    for k in range(gm * gn):
        i, j = divmod(k, gn)
        full[i * p:(i + 1) * p, j * p:(j + 1) * p] = scipy.fft.idctn(coeffs[k].reshape(p, p), norm="ortho")
    return full[:m, :n], p, widths


def _patch_norms(d, p):
    gm, gn = -(-d.shape[0] // p), -(-d.shape[1] // p)
    padded = np.zeros((gm * p, gn * p))
    padded[:d.shape[0], :d.shape[1]] = d
    return np.array([np.linalg.norm(padded[i * p:(i + 1) * p, j * p:(j + 1) * p])
                     for i in range(gm) for j in range(gn)])


@pytest.mark.parametrize("allocation", ["rd", "ladder"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_delta_dct_matches_a_scipy_decoder(pair, ratio, allocation):
    art, result = run(pair, "delta_dct", ratio, {"allocation": allocation})
    check_ratio(art, result, ratio)
    for name, (d_hat, data) in decoded(art, pair["base"]).items():
        ref, p, widths = _dct_reference_decode(data, pair["delta"][name].shape)
        assert np.allclose(d_hat, ref, atol=1e-6 * max(1.0, np.abs(ref).max()))
        norms = _patch_norms(pair["delta"][name], p)
        if allocation == "ladder":  # bits follow the norm rank exactly: (2c, c, 0)
            assert len(set(widths.tolist())) <= 3 and 0 in widths
            for w_hi in set(widths.tolist()):
                for w_lo in set(widths.tolist()):
                    if w_hi > w_lo:
                        assert norms[widths == w_hi].min() >= norms[widths == w_lo].max() - 1e-12
        else:  # rate-distortion: more bits go to larger patches on the whole
            levels = sorted(set(widths.tolist()))
            means = [norms[widths == w].mean() for w in levels]
            assert means == sorted(means)


@pytest.mark.parametrize("ratio", [8, 16])
def test_delta_dct_projection_rescale_restores_the_component_along_the_delta(pair, ratio):
    """rescale=projection: <d, d_hat> = ||d||^2 (up to the fp16 factor), where plain
    quantisation keeps less; the ratio still holds and a SciPy decode agrees."""
    plain_art, _ = run(pair, "delta_dct", ratio, {})
    art, result = run(pair, "delta_dct", ratio, {"rescale": "projection"})
    check_ratio(art, result, ratio)
    plain = decoded(plain_art, pair["base"])
    for name, (d_hat, data) in decoded(art, pair["base"]).items():
        d = pair["delta"][name]
        ref, _, _ = _dct_reference_decode(data, d.shape, rescaled=True)
        assert np.allclose(d_hat, ref, atol=1e-6 * max(1.0, np.abs(ref).max()))
        along = float((d * d_hat).sum()) / float((d * d).sum())
        assert abs(along - 1.0) < 2e-3, (name, along)
        plain_along = float((d * plain[name][0]).sum()) / float((d * d).sum())
        assert plain_along < 0.999, (name, plain_along)


def test_delta_dct_transform_is_scipy_dctn():
    from engine.compress.methods.delta_dct import to_patches
    from engine.compress.quant import dct_matrix

    x = torch.randn(40, 24, dtype=torch.float32)
    patches, gm, gn = to_patches(x, 8)
    C = dct_matrix(8)
    ours = (C @ patches @ C.T).double().numpy()
    for k in range(gm * gn):
        i, j = divmod(k, gn)
        block = x[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].double().numpy()
        assert np.allclose(ours[k], scipy.fft.dctn(block, norm="ortho"), atol=1e-5)


def test_dbms_rebuild_is_shifted_base_plus_scaled_delta(pair):
    params = {"inner": "svd", "alpha": 0.1, "scale": 0.5}
    art, result = run(pair, "dbms", 8, params)
    check_ratio(art, result, 8)
    rebuilt = rebuild_state_dict(art, pair["base"], device="cpu")
    for name, (d_hat, _) in decoded(art, pair["base"]).items():
        expected = 1.1 * pair["base_t"][name].double().numpy() + 0.5 * d_hat
        assert np.allclose(rebuilt[name].double().numpy(), expected, atol=1e-6)
        r = result.tensors[name]["rank"]
        u, s, vt = np.linalg.svd(pair["delta"][name], full_matrices=False)
        assert np.linalg.norm(d_hat - (u[:, :r] * s[:r]) @ vt[:r]) < 2e-3 * np.linalg.norm(s)


def test_more_bytes_never_hurt_and_impart_beats_dare(pair):
    errs = {}
    for method in ("svd", "delta_come", "delta_dct", "magnitude", "bitdelta", "impart", "dare"):
        for ratio in RATIOS:
            seeded = method in ("impart", "dare")
            params = ({"seed": 5 if method == "impart" else 3} if seeded
                      else {"distill": False} if method == "bitdelta" else None)
            art, _ = run(pair, method, ratio, params)
            errs[method, ratio] = rel_err(rebuild_state_dict(art, pair["base"], device="cpu"),
                                          matrices(pair["ft_t"]), pair["base_t"])
        if method not in ("impart", "dare"):  # deterministic: more bytes, less error
            assert errs[method, 8] < errs[method, 32] < 1.0, method
    # random drop-and-rescale is unbiased but noisy; importance-aware drop is far less so
    for ratio in RATIOS:
        assert errs["impart", ratio] < 1.0 < errs["dare", ratio]


@pytest.mark.parametrize("method,params,check", [
    ("magnitude", {"density": 0.1}, lambda info, shape: info["kept"] == round(0.1 * shape[0] * shape[1])),
    ("dare", {"density": 0.05}, lambda info, shape: info["kept"] == round(0.05 * shape[0] * shape[1])),
    ("svd", {"rank": 3}, lambda info, shape: info["rank"] == 3),
    ("bitdelta", {"planes": 1, "distill": False}, lambda info, shape: info["planes"] == 1),
    ("delta_come", {"n8": 1, "n3": 2, "n2": 5}, lambda info, shape: (info["n8"], info["n3"], info["n2"]) == (1, 2, 5)),
    ("impart", {"sparsity": 0.95}, lambda info, shape: info["components"] >= 1),
    ("delta_dct", {"mean_bits": 1.0, "patch_size": 8}, lambda info, shape: info["mean_bits"] <= 1.0),
    ("delta_dct", {"mean_bits": 1.0, "allocation": "ladder"}, lambda info, shape: info["mean_bits"] <= 1.01),
    ("impart", {"sparsity": 0.9, "quant": True}, lambda info, shape: info["components"] >= 1),
])
def test_explicit_parameters_instead_of_a_ratio(pair, method, params, check):
    art, result = run(pair, method, None, params)
    shapes = {n: tuple(t.shape) for n, t in matrices(pair["ft_t"]).items()}
    for name, info in result.tensors.items():
        assert check(info, shapes[name]), (name, info)
    rebuilt = rebuild_state_dict(art, pair["base"], device="cpu")
    assert method == "dare" or rel_err(rebuilt, matrices(pair["ft_t"]), pair["base_t"]) < 1.0


def test_ratio_and_explicit_solved_parameter_conflict(pair, tmp_path):
    with pytest.raises(ParameterError, match="either --ratio or density"):
        compress(pair["base"], pair["ft"], tmp_path / "a", "magnitude", ratio=8, params={"density": 0.1})
    with pytest.raises(ParameterError, match="give --ratio or"):
        compress(pair["base"], pair["ft"], tmp_path / "b", "svd")
    with pytest.raises(ParameterError, match="unknown compression method"):
        compress(pair["base"], pair["ft"], tmp_path / "c", "zip", ratio=8)
    with pytest.raises(ParameterError):
        compress(pair["base"], pair["ft"], tmp_path / "d", "delta_dct", ratio=8, params={"bogus": 1})
    assert not any(tmp_path.iterdir())


def test_delta_come_least_squares_correction_lowers_the_error(pair):
    plain, _ = run(pair, "delta_come", 16, {"group_size": 32})
    fixed, _ = run(pair, "delta_come", 16, {"group_size": 32, "correct": True})
    errs = [rel_err(rebuild_state_dict(a, pair["base"], device="cpu"), matrices(pair["ft_t"]), pair["base_t"])
            for a in (plain, fixed)]
    assert errs[1] < errs[0]
