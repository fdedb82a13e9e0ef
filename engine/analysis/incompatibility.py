"""Neural-incompatibility maps between two models of different width/depth (after LaTen:
Tan et al., "Neural Incompatibility: The Unbridgeable Gap of Cross-Scale Parametric Knowledge
Transfer in Large Language Models", ACL 2025).

Two maps, both layer x layer (model A's layers in rows, model B's in columns):

1. **Activation similarity**: linear CKA between the hidden states of A's layer i and B's layer
   j on the same probe prompts (the zoo's held-out task prompts with their answers, from
   ``engine.evaluate.tasks``). ``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on
   column-centred features, float64. Rows of X and Y are tokens when both tokenizers give the
   same ids for every prompt (the zoo's families share one), else prompts (mean over tokens).
   Index 0 is the embedding output, index i the output of block i (as ``output_hidden_states``).
2. **Parameter similarity** (our measure; the paper compares weights only at one scale): for
   every per-layer weight matrix both models have (same name suffix after ``layers.<i>.``,
   e.g. ``self_attn.q_proj.weight``), the debiased linear CKA of the token Gram matrices the
   two matrices induce (``parameter_similarity``): each matrix's metric on the side that runs
   over hidden units, less its isotropic part, read on its model's own token embeddings, so
   the measure is invariant to
   permutations and orthogonal changes of either model's hidden basis and defined between
   any widths. ``modules[suffix]`` holds the signed values; ``mean_abs`` averages |value| over
   the modules. With ``base_a``/``base_b`` the task vectors are compared instead of the
   weights. (It replaces a crop of both matrices to the smaller one's leading singular-vector
   rows and columns, which compared hidden units with no correspondence.)

LaTen's finding is that both are low across scales; ``summary`` says where: per layer of A,
its best-matching layer of B and that value, and the lowest cells.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.compat import embed_head_names
from engine.errors import ParameterError
from engine.io import ModelFolder
from engine.tensor_names import split_layer



class IncompatibilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_per_task: int = Field(8, ge=1, le=512, description="Held-out probe prompts per zoo task.")
    tasks: list[str] | None = Field(None, description="Zoo tasks whose prompts probe the models (default: all).")
    with_answers: bool = Field(True, description="Append each prompt's answer to the probe text.")
    batch_size: int = Field(64, ge=1, le=4096)
    param_tokens: int = Field(1024, ge=8, le=8192, description="Token ids (embedding rows) through "
                              "which the parameter map reads each matrix; all when the vocabulary is smaller.")
    subspace_rank: int = Field(8, ge=1, le=4096, description="Principal directions per matrix in the subspace map.")


# --------------------------------------------------------------------------- CKA
def _centre(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Linear CKA of two feature matrices with the same rows (n x d1, n x d2); None when
    either has no variance."""
    if x.shape[0] != y.shape[0]:
        raise ParameterError(f"CKA needs the same rows: {x.shape[0]} != {y.shape[0]}")
    xc, yc = _centre(x), _centre(y)
    cross = torch.linalg.matrix_norm(yc.mT @ xc) ** 2
    nx = torch.linalg.matrix_norm(xc.mT @ xc)
    ny = torch.linalg.matrix_norm(yc.mT @ yc)
    if float(nx) == 0.0 or float(ny) == 0.0:
        return None
    return float(cross / (nx * ny))


def cka_matrix(states_a: Sequence[torch.Tensor], states_b: Sequence[torch.Tensor]) -> list[list[float | None]]:
    """CKA of every layer of A against every layer of B. Gram matrices are computed once each."""
    grams_a = [_gram(x) for x in states_a]
    grams_b = [_gram(y) for y in states_b]
    return [[_cka_from(ga, gb) for gb in grams_b] for ga in grams_a]


def _gram(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Centred features and ||X^T X||_F (the Gram in the feature space)."""
    xc = _centre(x)
    return xc, float(torch.linalg.matrix_norm(xc.mT @ xc))


def _cka_from(ga: tuple[torch.Tensor, float], gb: tuple[torch.Tensor, float]) -> float | None:
    (xc, nx), (yc, ny) = ga, gb
    if nx == 0.0 or ny == 0.0:
        return None
    return float(torch.linalg.matrix_norm(yc.mT @ xc) ** 2) / (nx * ny)


# --------------------------------------------------------------------------- hidden states
def probe_texts(params: IncompatibilityParams | None = None) -> list[str]:
    """The probe prompts: held-out examples of every zoo task (the same on every machine)."""
    from engine.evaluate.tasks import TASK_NAMES, TASKS, heldout_examples

    params = params or IncompatibilityParams()
    names = TASK_NAMES if params.tasks is None else params.tasks
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ParameterError(f"unknown task(s) {unknown}; known: {TASK_NAMES}")
    texts = []
    for name in names:
        for prompt, answer in heldout_examples(TASKS[name], params.n_per_task):
            texts.append(prompt + answer if params.with_answers else prompt)
    return texts


@torch.no_grad()
def hidden_states(model, token_ids: list[list[int]], *, pad_id: int, batch_size: int = 64,
                  pool: bool = False) -> list[torch.Tensor]:
    """Per layer (embeddings first), the hidden states of every real token (rows in prompt
    order), or one mean row per prompt with ``pool``. Float32, CPU."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] | None = None
    for start in range(0, len(token_ids), batch_size):
        rows = token_ids[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: real tokens keep positions 0..len-1
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        states = out.hidden_states
        if per_layer is None:
            per_layer = [[] for _ in states]
        keep = mask.bool()
        for layer, h in enumerate(states):
            h = h.float().cpu()
            if pool:
                m = mask.unsqueeze(2).float()
                per_layer[layer].append((h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0))
            else:
                per_layer[layer].append(h[keep])
    return [torch.cat(chunks) for chunks in (per_layer or [])]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]


def activation_similarity(path_a: str | Path, path_b: str | Path,
                          params: IncompatibilityParams | None = None) -> dict:
    """``{"cka": La+1 x Lb+1, "rows": "tokens"|"prompts", "probes": n, ...}``."""
    from engine.evaluate.loading import load_model_folder

    params = params or IncompatibilityParams()
    texts = probe_texts(params)
    model_a, tok_a = load_model_folder(path_a)
    model_b, tok_b = load_model_folder(path_b)
    ids_a, ids_b = _token_ids(tok_a, texts), _token_ids(tok_b, texts)
    pool = ids_a != ids_b
    pad_a = tok_a.pad_token_id if tok_a.pad_token_id is not None else 0
    pad_b = tok_b.pad_token_id if tok_b.pad_token_id is not None else 0
    states_a = hidden_states(model_a, ids_a, pad_id=pad_a, batch_size=params.batch_size, pool=pool)
    states_b = hidden_states(model_b, ids_b, pad_id=pad_b, batch_size=params.batch_size, pool=pool)
    return {"cka": cka_matrix(states_a, states_b), "rows": "prompts" if pool else "tokens",
            "probes": len(texts), "samples": int(states_a[0].shape[0]),
            "width_a": int(states_a[0].shape[1]), "width_b": int(states_b[0].shape[1])}


# --------------------------------------------------------------------------- parameters
PARAMETER_MEASURE = "debiased linear CKA of token Gram matrices (hidden-side metric, isotropic part removed)"

# Per-layer matrices that WRITE to the residual stream (their output side is the hidden basis);
# needed only for square hidden x hidden matrices, whose shape does not say which side it is.
RESIDUAL_WRITERS = frozenset({"o_proj", "out_proj", "down_proj", "c_proj", "dense", "fc2", "w2",
                              "wo", "dense_4h_to_h"})


def layer_tensors(folder: ModelFolder) -> dict[int, dict[str, str]]:
    """{layer index: {suffix: tensor name}} for every 2-D per-layer tensor."""
    out: dict[int, dict[str, str]] = {}
    for name in folder.tensor_names:
        split = split_layer(name)
        if (split is not None and split[1] and len(folder.info(name).shape) == 2
                and folder.info(name).dtype.is_floating_point):
            out.setdefault(split[0], {})[split[1]] = name
    return dict(sorted(out.items()))


def residual_side(suffix: str, shape: Sequence[int], width: int, *, conv1d: bool = False) -> int | None:
    """Which axis of a stored per-layer matrix runs over the hidden (residual-stream) units: 0
    (rows) or 1 (columns); None when neither has the model's width. A square width x width
    matrix is told by its module: a residual writer (``RESIDUAL_WRITERS``) faces it with its
    output side (rows of an nn.Linear weight, columns of a GPT-2 Conv1D one), any other module
    with its input side."""
    rows, cols = int(shape[0]), int(shape[1])
    if rows == width and cols != width:
        return 0
    if cols == width and rows != width:
        return 1
    if rows == cols == width:
        parts = suffix.split(".")
        leaf = parts[-2] if len(parts) >= 2 else parts[0]  # "self_attn.o_proj.weight" -> o_proj
        writes = leaf in RESIDUAL_WRITERS
        output_axis, input_axis = (1, 0) if conv1d else (0, 1)
        return output_axis if writes else input_axis
    return None


def hidden_metric(w: torch.Tensor, side: int) -> torch.Tensor:
    """The matrix's metric on its hidden side, less its isotropic part (float64, width x width):
    M = W^T W (side 1) or W W^T (side 0), minus (tr M / width) I. A change of hidden basis Q (a
    permutation, any rotation) gives Q^T M Q; a rotation of the other side leaves M as it is.
    The isotropic part is what any near-isotropic matrix (one at random initialisation) has:
    removed, two such matrices no longer look alike merely for preserving the embeddings'
    geometry."""
    w = w.double()
    m = w.mT @ w if side == 1 else w @ w.mT
    return m - (torch.trace(m) / m.shape[0]) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def token_gram(w: torch.Tensor, embed_rows: torch.Tensor, side: int) -> torch.Tensor:
    """K = E M E^T (n x n, float64): the probe tokens' embeddings E (n x width, this model's own)
    read through the matrix's hidden metric M (``hidden_metric``). A change of hidden basis Q
    turns E into E Q and M into Q^T M Q, so K does not change: K is indexed by tokens, which
    both models share, and by nothing of either model's hidden units."""
    e = embed_rows.double()
    return e @ hidden_metric(w, side) @ e.mT


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (JMLR 2012, eq. 5) unbiased HSIC of two n x n Gram matrices (n > 3):
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with a zero
    diagonal."""
    n = k.shape[0]
    if n <= 3:
        raise ParameterError(f"the unbiased HSIC needs more than 3 tokens, got {n}")
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    trace = float((kt * lt).sum())
    sum_k, sum_l = float(kt.sum()), float(lt.sum())
    cross = float(kt.sum(dim=1) @ lt.sum(dim=1))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def debiased_cka(k: torch.Tensor, l: torch.Tensor) -> float | None:
    """HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)): 1 for Gram matrices equal up to scale,
    about 0 (either sign) for unrelated features however few the tokens (plain linear CKA of
    n tokens and p > n features is near 1 for unrelated ones); None for a constant side."""
    kk, ll = unbiased_hsic(k, k), unbiased_hsic(l, l)
    if kk <= 0.0 or ll <= 0.0:
        return None
    return unbiased_hsic(k, l) / math.sqrt(kk * ll)


def probe_token_ids(vocab: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """The token ids whose embeddings probe the matrices: all when the shared vocabulary has at
    most ``n_tokens``, else ``n_tokens`` distinct ids drawn with ``seed`` (sorted)."""
    if vocab <= n_tokens:
        return torch.arange(vocab)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=g)[:n_tokens].sort().values


def _check_bases(base_a, base_b) -> None:
    if (base_a is None) != (base_b is None):
        raise ParameterError("give both bases (task vectors) or neither (weights)")


def _embedding(folder: ModelFolder) -> torch.Tensor:
    embed, _ = embed_head_names(folder)
    if embed is None or len(folder.info(embed).shape) != 2:
        raise ParameterError("no 2-D input embedding to read the hidden basis from", path=folder.path)
    return folder.get_tensor(embed)


def _is_conv1d(folder: ModelFolder) -> bool:
    return folder.config.get("model_type") == "gpt2"  # transformers' Conv1D stores (in, out)


def parameter_similarity(path_a: str | Path, path_b: str | Path, *, base_a: str | Path | None = None,
                         base_b: str | Path | None = None, n_tokens: int = 1024,
                         seed: int = 0) -> dict:
    """``{"modules": {suffix: La x Lb similarities}, "mean_abs": La x Lb, "measure", "tokens"}``.

    Our measure (the paper defines none across widths): hidden units of two models have no
    correspondence, so matrices are compared through what both share, the token ids (the same
    tokenizer; with vocabularies of different sizes, the leading ids both have). For every
    per-layer matrix W, its metric on the hidden side (``residual_side``) less the isotropic
    part, M, read on this model's input embeddings of the probe tokens, gives a Gram matrix
    K = E M E^T over tokens (``token_gram``), invariant to any permutation or orthogonal change
    of the hidden basis and of the matrix's other side; two models' matrices are compared by
    the debiased linear CKA of their K (``debiased_cka``): 1 for a model against a
    hidden-unit-permuted copy of itself, about 0 for unrelated ones, signed. The token
    geometry of the embeddings is part of what is compared: two models of one family whose
    embeddings agree score higher than their matrices alone would. With ``base_a``/``base_b`` W is the task
    vector. ``mean_abs`` averages |similarity| over the modules."""
    _check_bases(base_a, base_b)
    with ModelFolder(path_a) as fa, ModelFolder(path_b) as fb:
        ba = ModelFolder(base_a) if base_a is not None else None
        bb = ModelFolder(base_b) if base_b is not None else None
        try:
            layers_a, layers_b = layer_tensors(fa), layer_tensors(fb)
            suffixes = sorted({s for d in layers_a.values() for s in d}
                              & {s for d in layers_b.values() for s in d})
            ia, ib = list(layers_a), list(layers_b)
            emb_a, emb_b = _embedding(fa), _embedding(fb)
            ids = probe_token_ids(min(emb_a.shape[0], emb_b.shape[0]), n_tokens, seed)
            probes = {"a": (emb_a[ids].double(), int(emb_a.shape[1]), _is_conv1d(fa)),
                      "b": (emb_b[ids].double(), int(emb_b.shape[1]), _is_conv1d(fb))}

            def gram(folder, base, name, suffix, which):
                rows, width, conv1d = probes[which]
                side = residual_side(suffix, folder.info(name).shape, width, conv1d=conv1d)
                if side is None:
                    return None
                t = folder.get_tensor(name).double()
                if base is not None:
                    t = t - base.get_tensor(name).double()
                return token_gram(t, rows, side)

            modules: dict[str, list[list[float | None]]] = {}
            for suffix in suffixes:
                grams_a = {i: gram(fa, ba, layers_a[i][suffix], suffix, "a")
                           for i in ia if suffix in layers_a[i]}
                grams_b = {j: gram(fb, bb, layers_b[j][suffix], suffix, "b")
                           for j in ib if suffix in layers_b[j]}
                if all(g is None for g in (*grams_a.values(), *grams_b.values())):
                    continue  # no side of this module runs over the hidden units
                modules[suffix] = [[(debiased_cka(grams_a[i], grams_b[j])
                                     if grams_a.get(i) is not None and grams_b.get(j) is not None
                                     else None) for j in ib] for i in ia]
        finally:
            if ba is not None:
                ba.close()
                bb.close()
    mean_abs = []
    for r in range(len(ia)):
        row = []
        for c in range(len(ib)):
            vals = [abs(m[r][c]) for m in modules.values() if m[r][c] is not None]
            row.append(sum(vals) / len(vals) if vals else None)
        mean_abs.append(row)
    return {"layers_a": ia, "layers_b": ib, "modules": modules, "mean_abs": mean_abs,
            "measure": PARAMETER_MEASURE, "tokens": int(ids.numel())}


# --------------------------------------------------------------------------- both maps
def _summary(matrix: list[list[float | None]], lowest: int = 5) -> dict:
    best = []
    cells = []
    for i, row in enumerate(matrix):
        vals = [(v, j) for j, v in enumerate(row) if v is not None]
        if vals:
            v, j = max(vals)
            best.append({"row": i, "best_col": j, "value": v})
        cells.extend((v, i, j) for v, j in vals)
    cells.sort()
    finite = [v for v, _, _ in cells if math.isfinite(v)]
    return {"best_match": best, "lowest": [{"row": i, "col": j, "value": v} for v, i, j in cells[:lowest]],
            "mean": (sum(finite) / len(finite)) if finite else None}


def _maps_key(paths: list[str | Path | None], params: IncompatibilityParams) -> tuple:
    """Cache key of a pair of maps: every weight file of every model involved, and the params."""
    import hashlib
    import json

    from engine.analysis.run import ENGINE_VERSION

    from engine.analysis.subspace import SUBSPACE_MEASURE

    prints = [PARAMETER_MEASURE, SUBSPACE_MEASURE]
    for path in paths:
        if path is None:
            prints.append(None)
            continue
        with ModelFolder(path) as folder:
            prints.append(folder.file_fingerprints())
    canon = lambda value: json.dumps(value, sort_keys=True, separators=(",", ":"))  # noqa: E731
    fingerprint = hashlib.sha256(canon(prints).encode()).hexdigest()
    return (fingerprint, "*", "incompatibility", canon(params.model_dump(mode="json")), ENGINE_VERSION)


def incompatibility_maps(path_a: str | Path, path_b: str | Path,
                         params: IncompatibilityParams | None = None, *,
                         base_a: str | Path | None = None, base_b: str | Path | None = None,
                         cache=None) -> dict:
    """Both maps between models A and B (A is usually the smaller), with summaries; read from
    and written to ``cache`` (a ``cache.MetricStore``) when given."""
    params = params or IncompatibilityParams()
    _check_bases(base_a, base_b)  # before any model is loaded
    key = _maps_key([path_a, path_b, base_a, base_b], params) if cache is not None else None
    if key is not None:
        hit = cache.get_many([key]).get(key)
        if hit is not None:
            return hit
    activation = activation_similarity(path_a, path_b, params)
    parameters = parameter_similarity(path_a, path_b, base_a=base_a, base_b=base_b,
                                      n_tokens=params.param_tokens)
    from engine.analysis.subspace import subspace_map

    subspace = subspace_map(path_a, path_b, base_a=base_a, base_b=base_b,
                            n_tokens=params.param_tokens, rank=params.subspace_rank)
    result = {
        "model_a": str(path_a), "model_b": str(path_b),
        "activation": {**activation, "summary": _summary(activation["cka"])},
        "parameters": {**parameters, "summary": _summary(parameters["mean_abs"])},
        "subspace": {**subspace, "summary": _summary(subspace["mean"])},
    }
    if key is not None:
        cache.put_many([(key, result)])
    return result
