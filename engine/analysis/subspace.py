"""Unit-order-free comparisons of two models' weight matrices across widths (ours, beside the
debiased-CKA parameter map of ``engine.analysis.incompatibility``):

- **token-space principal subspace overlap**: a per-layer matrix W is read on its model's own
  token embeddings E (n probe tokens x width) from its hidden side, ``T = E W^T`` (a reader) or
  ``T = E W`` (a writer), an n-row matrix indexed by tokens, which both models share; its top-k
  left singular vectors span a k-dimensional subspace of token space. Two matrices are compared
  by the mean squared cosine of the principal angles between their subspaces (1: the same
  subspace, k/n: unrelated ones on average). A permutation or rotation of either model's
  hidden units leaves T, and so the value, unchanged.
- **singular-value spectrum similarity**: the cosine of the two matrices' sorted singular values
  (each normalised to unit length, the shorter padded with zeros): unchanged by any
  permutation or rotation of either side of either matrix.

A crop of the larger matrix to the smaller's leading rows and columns (what the map once did)
compares hidden units with no correspondence and changes under a permutation of them; the
tests show both.
"""

from __future__ import annotations

import torch

SUBSPACE_MEASURE = "token-space principal subspace overlap (mean cos^2 of principal angles)"


def token_side(w: torch.Tensor, embed_rows: torch.Tensor, side: int) -> torch.Tensor:
    """``E W^T`` (side 1: W's columns run over hidden units) or ``E W`` (side 0: its rows)."""
    w, e = w.double(), embed_rows.double()
    return e @ w.mT if side == 1 else e @ w


def principal_basis(t: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (n x k) of the top-k left singular subspace of ``t``."""
    u, _, _ = torch.linalg.svd(t.double(), full_matrices=False)
    return u[:, :min(k, u.shape[1])]


def principal_cosines(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u) and span(v) (orthonormal columns),
    largest first: the singular values of ``u^T v`` (Bjorck and Golub)."""
    return torch.linalg.svdvals(u.mT @ v).clamp(0.0, 1.0)


def subspace_overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles (over min(k_u, k_v) angles)."""
    return float(principal_cosines(u, v).pow(2).mean())


def spectrum_similarity(w_a: torch.Tensor, w_b: torch.Tensor) -> float | None:
    """Cosine of the normalised, sorted singular values (zero-padded); None for a zero matrix."""
    sa, sb = torch.linalg.svdvals(w_a.double()), torch.linalg.svdvals(w_b.double())
    n = max(sa.numel(), sb.numel())
    sa = torch.nn.functional.pad(sa, (0, n - sa.numel()))
    sb = torch.nn.functional.pad(sb, (0, n - sb.numel()))
    na, nb = float(sa.norm()), float(sb.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(sa @ sb) / (na * nb)


def cropped_cosine(w_a: torch.Tensor, w_b: torch.Tensor) -> float:
    """The old crop: the cosine of both matrices cut to their common leading rows and columns
    (kept only to show, in tests, that it depends on the order of hidden units)."""
    r, c = min(w_a.shape[0], w_b.shape[0]), min(w_a.shape[1], w_b.shape[1])
    x, y = w_a[:r, :c].double().flatten(), w_b[:r, :c].double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def subspace_map(path_a, path_b, *, base_a=None, base_b=None, n_tokens: int = 1024, rank: int = 8,
                 seed: int = 0) -> dict:
    """``{"modules": {suffix: La x Lb overlaps}, "spectrum": {suffix: La x Lb}, "mean": La x Lb,
    "measure", "rank", "tokens"}``: every per-layer matrix both models have, read through the
    same probe tokens as the debiased-CKA map (task vectors with both bases)."""
    from engine.analysis.incompatibility import (_check_bases, _embedding, _is_conv1d, layer_tensors,
                                                 probe_token_ids, residual_side)
    from engine.io import ModelFolder

    _check_bases(base_a, base_b)
    with ModelFolder(path_a) as fa, ModelFolder(path_b) as fb:
        ba = ModelFolder(base_a) if base_a is not None else None
        bb = ModelFolder(base_b) if base_b is not None else None
        try:
            layers_a, layers_b = layer_tensors(fa), layer_tensors(fb)
            suffixes = sorted({s for d in layers_a.values() for s in d} & {s for d in layers_b.values() for s in d})
            ia, ib = list(layers_a), list(layers_b)
            emb_a, emb_b = _embedding(fa), _embedding(fb)
            ids = probe_token_ids(min(emb_a.shape[0], emb_b.shape[0]), n_tokens, seed)

            def read(folder, base, emb, name, suffix):
                side = residual_side(suffix, folder.info(name).shape, int(emb.shape[1]),
                                     conv1d=_is_conv1d(folder))
                if side is None:
                    return None
                w = folder.get_tensor(name).double()
                if base is not None:
                    w = w - base.get_tensor(name).double()
                return w, principal_basis(token_side(w, emb[ids], side), rank)

            modules, spectra = {}, {}
            for suffix in suffixes:
                got_a = {i: read(fa, ba, emb_a, layers_a[i][suffix], suffix) for i in ia if suffix in layers_a[i]}
                got_b = {j: read(fb, bb, emb_b, layers_b[j][suffix], suffix) for j in ib if suffix in layers_b[j]}
                if all(g is None for g in (*got_a.values(), *got_b.values())):
                    continue
                modules[suffix] = [[subspace_overlap(got_a[i][1], got_b[j][1])
                                    if got_a.get(i) is not None and got_b.get(j) is not None else None
                                    for j in ib] for i in ia]
                spectra[suffix] = [[spectrum_similarity(got_a[i][0], got_b[j][0])
                                    if got_a.get(i) is not None and got_b.get(j) is not None else None
                                    for j in ib] for i in ia]
        finally:
            if ba is not None:
                ba.close()
                bb.close()
    mean = [[(lambda vals: sum(vals) / len(vals) if vals else None)(
        [m[r][c] for m in modules.values() if m[r][c] is not None]) for c in range(len(ib))]
        for r in range(len(ia))]
    return {"layers_a": ia, "layers_b": ib, "modules": modules, "spectrum": spectra, "mean": mean,
            "measure": SUBSPACE_MEASURE, "rank": rank, "tokens": int(ids.numel())}
