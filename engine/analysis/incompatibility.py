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
2. **Parameter similarity**: for every per-layer weight matrix both models have (same name
   suffix after ``layers.<i>.``, e.g. ``self_attn.q_proj.weight``), each matrix is projected to
   the common shape (min rows, min cols) through its top singular vectors:
   ``W' = U[:rows, :r] diag(s[:r]) V[:cols, :r]^T`` with r = min(rows, cols) (a matrix that
   already has the common shape is unchanged), and the two are compared by the cosine of the
   flattened matrices. ``modules[suffix]`` holds the signed cosines; ``mean_abs`` averages
   |cosine| over the modules. With ``base_a``/``base_b`` the task vectors are compared instead
   of the weights.

LaTen's finding is that both are low across scales; ``summary`` says where: per layer of A,
its best-matching layer of B and that value, and the lowest cells.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ParameterError
from engine.io import ModelFolder
from engine.tensor_names import split_layer



class IncompatibilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_per_task: int = Field(8, ge=1, le=512, description="Held-out probe prompts per zoo task.")
    tasks: list[str] | None = Field(None, description="Zoo tasks whose prompts probe the models (default: all).")
    with_answers: bool = Field(True, description="Append each prompt's answer to the probe text.")
    batch_size: int = Field(64, ge=1, le=4096)


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
def layer_tensors(folder: ModelFolder) -> dict[int, dict[str, str]]:
    """{layer index: {suffix: tensor name}} for every 2-D per-layer tensor."""
    out: dict[int, dict[str, str]] = {}
    for name in folder.tensor_names:
        split = split_layer(name)
        if (split is not None and split[1] and len(folder.info(name).shape) == 2
                and folder.info(name).dtype.is_floating_point):
            out.setdefault(split[0], {})[split[1]] = name
    return dict(sorted(out.items()))


def project_matrix(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``w`` (m x n, m >= rows, n >= cols) projected to (rows x cols) through its top singular
    vectors (see the module docstring); unchanged when it already has that shape."""
    m, n = w.shape
    if rows > m or cols > n:
        raise ParameterError(f"cannot project a {m}x{n} matrix up to {rows}x{cols}")
    w = w.double()
    if (m, n) == (rows, cols):
        return w
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rows, cols, s.numel())
    return (u[:rows, :r] * s[:r]) @ vh[:r, :cols]


def _flat_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float((a.reshape(-1) @ b.reshape(-1)) / (na * nb))


def _check_bases(base_a, base_b) -> None:
    if (base_a is None) != (base_b is None):
        raise ParameterError("give both bases (task vectors) or neither (weights)")


def parameter_similarity(path_a: str | Path, path_b: str | Path, *, base_a: str | Path | None = None,
                         base_b: str | Path | None = None) -> dict:
    """``{"modules": {suffix: La x Lb cosines}, "mean_abs": La x Lb}`` (see module docstring)."""
    _check_bases(base_a, base_b)
    with ModelFolder(path_a) as fa, ModelFolder(path_b) as fb:
        ba = ModelFolder(base_a) if base_a is not None else None
        bb = ModelFolder(base_b) if base_b is not None else None
        layers_a, layers_b = layer_tensors(fa), layer_tensors(fb)
        suffixes = sorted({s for d in layers_a.values() for s in d} & {s for d in layers_b.values() for s in d})
        ia, ib = list(layers_a), list(layers_b)

        def load(folder, base, name):
            t = folder.get_tensor(name).double()
            if base is not None:
                t = t - base.get_tensor(name).double()
            return t

        modules: dict[str, list[list[float | None]]] = {}
        for suffix in suffixes:
            mats_a = {i: load(fa, ba, layers_a[i][suffix]) for i in ia if suffix in layers_a[i]}
            mats_b = {j: load(fb, bb, layers_b[j][suffix]) for j in ib if suffix in layers_b[j]}
            shapes = [tuple(t.shape) for t in (*mats_a.values(), *mats_b.values())]
            rows, cols = min(s[0] for s in shapes), min(s[1] for s in shapes)
            proj_a = {i: project_matrix(t, rows, cols) for i, t in mats_a.items()}
            proj_b = {j: project_matrix(t, rows, cols) for j, t in mats_b.items()}
            modules[suffix] = [[(_flat_cosine(proj_a[i], proj_b[j]) if i in proj_a and j in proj_b else None)
                                for j in ib] for i in ia]
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
    return {"layers_a": ia, "layers_b": ib, "modules": modules, "mean_abs": mean_abs}


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

    prints = []
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
    parameters = parameter_similarity(path_a, path_b, base_a=base_a, base_b=base_b)
    result = {
        "model_a": str(path_a), "model_b": str(path_b),
        "activation": {**activation, "summary": _summary(activation["cka"])},
        "parameters": {**parameters, "summary": _summary(parameters["mean_abs"])},
    }
    if key is not None:
        cache.put_many([(key, result)])
    return result
