"""Per-method parameter sets for the invariant tests (3 fine-tunes unless the method takes one)."""

from tests.merge.helpers import rand

N = 3
W = [1.0, 2.0, 0.5]
THIRD = [1 / 3] * 3


def generic(name):
    """(model params, params) exercising the method's sparsification/randomness."""
    seeds = [21, 22, 23]
    table = {
        "linear": ([{"weight": w} for w in W], {}),
        "task_arithmetic": ([{"weight": w} for w in (0.5, 0.3, 0.2)], {"lambda": 0.9}),
        "ties": ([{"weight": w, "density": k} for w, k in zip(W, (0.5, 0.4, 0.7))], {}),
        "dare_linear": ([{"weight": w, "density": 0.5, "seed": s} for w, s in zip(W, seeds)], {}),
        "dare_ties": ([{"weight": w, "density": 0.6, "seed": s} for w, s in zip(W, seeds)], {}),
        "breadcrumbs": ([{"weight": w, "density": 0.6, "gamma": 0.1} for w in W], {}),
        "breadcrumbs_ties": ([{"weight": w, "density": 0.6, "gamma": 0.1} for w in W], {}),
        "della": ([{"weight": w, "density": 0.5, "epsilon": 0.1, "seed": s} for w, s in zip(W, seeds)], {}),
        "della_linear": ([{"weight": w, "density": 0.5, "epsilon": 0.1, "seed": s} for w, s in zip(W, seeds)], {}),
        "slerp": ([{}], {"t": 0.4}),
        "model_stock": ([{}] * N, {}),
        "consensus": ([{"weight": w, "tall_mask_lambda": l} for w, l in zip(W, (0.3, 0.4, 0.5))], {}),
        "tsv": ([{}] * N, {}),
        "emr": ([{}] * N, {}),
        "fisher": ([{"weight": w} for w in W], {}),
        "regmean": ([{"weight": w} for w in W], {}),
        "channel_merging": ([{"weight": w} for w in W], {"num_groups": 2}),
        "sotu": ([{"weight": w, "density": 0.3, "seed": s} for w, s in zip(W, seeds)], {}),
        "nuslerp": ([{"weight": 0.7}, {"weight": 0.3}], {"nuslerp_flatten": False}),
        "multislerp": ([{"weight": w} for w in W], {}),
        "karcher": ([{}] * N, {}),
        "sce": ([{}] * N, {"select_topk": 0.6}),
        "arcee_fusion": ([{}], {}),
        "nearswap": ([{}], {"t": 0.05}),
        "ram": ([{}] * N, {}),
        "ramplus_tl": ([{}] * N, {"r": 0.5, "alpha": 0.5}),
        "passthrough": ([{}], {}),  # its scale is no task-vector method: tests/merge/test_slices.py
    }
    return table[name]


def identity(name):
    """(model params, params) under which N copies of one fine-tune merge back to it."""
    table = {
        "linear": ([{"weight": w} for w in W], {}),
        "task_arithmetic": ([{"weight": w} for w in THIRD], {}),
        "ties": ([{"weight": w, "density": 1.0} for w in W], {}),
        "dare_linear": ([{"weight": w, "density": 1.0} for w in THIRD], {}),
        "dare_ties": ([{"weight": w, "density": 1.0} for w in THIRD], {}),
        "breadcrumbs": ([{"weight": w, "density": 1.0} for w in THIRD], {}),
        "breadcrumbs_ties": ([{"weight": w, "density": 1.0} for w in THIRD], {}),
        "della": ([{"weight": w, "density": 1.0} for w in W], {}),
        "della_linear": ([{"weight": w, "density": 1.0} for w in THIRD], {}),
        "slerp": ([{}], {"t": 0.4}),
        "model_stock": ([{}] * N, {}),
        # every copy's TALL mask is full when lambda_i (N - 1) < 1; lambda = 1/N undoes the sum
        "consensus": ([{"tall_mask_lambda": 0.4}] * N, {"lambda": 1 / 3}),
        "tsv": ([{}] * N, {}),
        "emr": ([{}] * N, {}),
        "fisher": ([{"weight": w} for w in W], {}),
        "regmean": ([{"weight": w} for w in W], {}),
        "channel_merging": ([{"weight": w} for w in W], {"num_groups": 2}),
        # disjoint masks covering every entry hand each entry to exactly one copy
        "sotu": ([{"density": k} for k in (0.5, 0.25, 0.25)], {"disjoint": True}),
        "nuslerp": ([{"weight": 1.0}, {"weight": 2.0}], {}),  # colinear task vectors: lerped
        "multislerp": ([{"weight": w} for w in W], {}),
        "karcher": ([{}] * N, {}),  # without a base: a base is one more input averaged in
        "sce": ([{}] * N, {}),
        "arcee_fusion": ([{}], {}),  # the base and one model, like slerp: the model with itself
        "nearswap": ([{}], {"t": 0.05}),
        "ram": ([{}] * N, {}),
        "ramplus_tl": ([{}] * N, {}),
        "passthrough": ([{}], {}),
    }
    return table[name]


def stats_for(name, tensors, seed=90):
    """Calibration statistics the method needs (None for the others)."""
    if name == "fisher":
        return [rand(*tensors[0].shape, seed=seed + i).abs() for i in range(len(tensors))]
    if name == "regmean" and tensors[0].dim() == 2:
        xs = [rand(30, tensors[0].shape[1], seed=seed + i) for i in range(len(tensors))]
        return [x.T @ x for x in xs]
    return None
