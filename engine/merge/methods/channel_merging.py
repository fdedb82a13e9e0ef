"""Channel Merging: merge only similar channels, store each group once, rebuild experts by lookup.

A channel is an output row of a weight (first dimension; a 1-D tensor is one channel). For
every channel position c, the N experts' rows at c are clustered by cosine similarity of the
L2-normalised rows (of the deltas when a base is given, as the paper clusters delta
parameters; of the weights otherwise) into at most G groups, by average-linkage agglomerative
clustering (deterministic) or spherical k-means (farthest-first seeding, deterministic).
Rows in a group are merged (weighted mean, or base + lambda * weighted sum of deltas), stored
once as rows[g, c], and expert i keeps index[i, c] = its group at c. Storage is about G/N of
the N experts plus one small integer per expert channel; expert i is rebuilt as
rows[index[i, c], c] for every c.

merge_tensor returns expert `expert` rebuilt, or with expert unset the w-weighted mean of the
rebuilt experts (for group_merge='average' this equals the linear merge of the inputs).

What is and is not the paper's (no authors' code is public; the method section could not be
retrieved, only the abstract and third-party summaries): verified are the channel granularity,
clustering by similarity offline into a few groups per channel, one stored row per group and
rebuilding an expert by lookup. NOT verified, and so our choices: the clustering algorithm
(a summary speaks of "K groups"; agglomerative average linkage is our default, spherical
k-means the option), the similarity (cosine of L2-normalised rows), whether the paper clusters
deltas or weights (a summary says delta parameters: we cluster deltas whenever a base is
given), and the in-group merge rule (a summary quotes task arithmetic, P + lambda sum of
deltas: our `task_arithmetic`; the default `average` is ours). G = 2 is consistent with the
abstract's "53% of the parameters" of four experts but is not a stated value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import DefaultWeight, MethodParams, finish, prepare_inputs

NAME = "channel_merging"
PAPER = "Zhang et al., Channel Merging: Preserving Specialization for Merged Experts, AAAI 2025 (arXiv:2412.15283)"
REQUIRES_BASE = False


class Params(MethodParams):
    num_groups: int = Field(2, ge=1, description="Groups per channel position (G); storage is about G/N of the N experts.")
    clustering: Literal["agglomerative", "kmeans"] = Field("agglomerative", description="How channels are clustered by cosine similarity "
                                                           "(the paper's algorithm is not verified; agglomerative is our default).")
    kmeans_iters: int = Field(20, ge=1, le=1000, description="Maximum k-means iterations.")
    group_merge: Literal["average", "task_arithmetic"] = Field(
        "average", description="Merge inside a group: weighted mean of rows (ours), or base + lambda * weighted sum of deltas "
        "(needs a base; the rule a summary of the paper quotes, not verified in its text)."
    )
    lambda_: float = Field(1.0, alias="lambda", description="Scale of the summed deltas for group_merge='task_arithmetic'.")
    expert: int | None = Field(None, ge=0, description="Return this expert rebuilt from the groups (0-based); empty = weighted mean of all.")


class ModelParams(DefaultWeight):
    weight: float = Field(1.0, gt=0.0, description="Weight of this expert's rows inside its groups.")


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.expert is not None and params.expert >= len(model_params):
        raise ParameterError(f"{NAME}: expert {params.expert} out of range for {len(model_params)} models")


@dataclass(frozen=True)
class ChannelGroups:
    rows: torch.Tensor  # (G, C, D) float32: merged row of group g at channel c
    index: torch.Tensor  # (N, C) uint8/int16: group holding expert i's channel c
    shape: tuple[int, ...]  # the original tensor shape

    @property
    def num_experts(self) -> int:
        return self.index.shape[0]

    def rebuild(self, expert: int) -> torch.Tensor:
        if not 0 <= expert < self.num_experts:
            raise ParameterError(f"{NAME}: expert {expert} out of range for {self.num_experts} experts")
        channels = torch.arange(self.rows.shape[1], device=self.rows.device)
        return self.rows[self.index[expert].to(self.rows.device).long(), channels].reshape(self.shape)


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def relabel_by_first_member(labels: torch.Tensor, slots: int) -> torch.Tensor:
    """Renumber cluster ids per channel in order of their lowest expert index (0, 1, ...)."""
    c, n = labels.shape
    members = torch.arange(n, device=labels.device).expand(c, n)
    first = torch.full((c, slots), n, dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(1, labels, members, reduce="amin")
    order = torch.argsort(first, dim=1, stable=True)
    new_id = torch.empty_like(order).scatter_(1, order, torch.arange(slots, device=labels.device).expand(c, slots))
    return new_id.gather(1, labels)


def agglomerative(sim: torch.Tensor, groups: int) -> torch.Tensor:
    """Average-linkage clustering of N items per channel; sim (C, N, N) cosine. Returns (C, N) ids."""
    c, n, _ = sim.shape
    rows = torch.arange(c, device=sim.device)
    s = sim.clone()
    s.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    size = torch.ones(c, n, dtype=sim.dtype, device=sim.device)
    labels = torch.arange(n, device=sim.device).expand(c, n).clone()
    for _ in range(n - groups):
        best = s.reshape(c, n * n).argmax(dim=1)
        a, b = best // n, best % n
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        size_lo, size_hi = size[rows, lo].unsqueeze(1), size[rows, hi].unsqueeze(1)
        # Lance-Williams update for average linkage (inactive entries stay -inf)
        merged = (size_lo * s[rows, lo] + size_hi * s[rows, hi]) / (size_lo + size_hi)
        s[rows, lo] = merged
        s[rows, :, lo] = merged
        s[rows, hi] = float("-inf")
        s[rows, :, hi] = float("-inf")
        s[rows, lo, lo] = float("-inf")
        size[rows, lo] += size[rows, hi].clone()
        labels = torch.where(labels == hi.unsqueeze(1), lo.unsqueeze(1), labels)
    return relabel_by_first_member(labels, n)


def spherical_kmeans(feats: torch.Tensor, groups: int, iters: int) -> torch.Tensor:
    """feats (C, N, D) unit rows; farthest-first seeds, Lloyd iterations on cosine. Returns (C, N) ids."""
    c, n, _ = feats.shape
    rows = torch.arange(c, device=feats.device)
    sim = feats @ feats.transpose(1, 2)
    seeds = [sim.sum(dim=2).argmax(dim=1)]  # the most central row
    closest = sim[rows, seeds[0]]
    taken = torch.zeros(c, n, dtype=torch.bool, device=feats.device)
    taken[rows, seeds[0]] = True
    for _ in range(1, groups):
        nxt = closest.masked_fill(taken, float("inf")).argmin(dim=1)
        seeds.append(nxt)
        taken[rows, nxt] = True
        closest = torch.maximum(closest, sim[rows, nxt])
    centers = torch.stack([feats[rows, s] for s in seeds], dim=1)  # (C, G, D)
    assign = None
    for _ in range(iters):
        new_assign = (feats @ centers.transpose(1, 2)).argmax(dim=2)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        onehot = F.one_hot(assign, groups).to(feats.dtype)  # (C, N, G)
        sums = onehot.transpose(1, 2) @ feats  # (C, G, D)
        counts = onehot.sum(dim=1).unsqueeze(2)
        centers = torch.where(counts > 0, F.normalize(sums, dim=2), centers)
    return relabel_by_first_member(assign, groups)


def channel_merge_layer(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Params,
) -> ChannelGroups:
    """Cluster and merge one tensor's channels across N float32 experts."""
    n = len(tensors)
    groups = min(params.num_groups, n)
    x = torch.stack([channel_rows(t) for t in tensors])  # (N, C, D)
    base_rows = channel_rows(base) if base is not None else None
    deltas = x - base_rows if base_rows is not None else None
    feats = F.normalize((deltas if deltas is not None else x).transpose(0, 1), dim=2)  # (C, N, D)
    if groups == n:
        labels = torch.arange(n, device=x.device).expand(x.shape[1], n)
    elif params.clustering == "agglomerative":
        labels = agglomerative(feats @ feats.transpose(1, 2), groups)
    else:
        labels = spherical_kmeans(feats, groups, params.kmeans_iters)
    w = torch.tensor(list(weights), dtype=x.dtype, device=x.device)
    share = F.one_hot(labels, groups).to(x.dtype) * w.view(1, -1, 1)  # (C, N, G)
    if params.group_merge == "average":
        total = share.sum(dim=1).T.unsqueeze(2)  # (G, C, 1)
        rows = torch.einsum("cng,ncd->gcd", share, x) / total.clamp(min=1e-30)
    else:
        rows = base_rows.unsqueeze(0) + params.lambda_ * torch.einsum("cng,ncd->gcd", share, deltas)
    index_dtype = torch.uint8 if groups <= 256 else torch.int16
    return ChannelGroups(rows=rows, index=labels.T.contiguous().to(index_dtype), shape=tuple(tensors[0].shape))


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    validate(params, model_params)
    needs_base = params.group_merge == "task_arithmetic"
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=needs_base)
    weights = [mp.weight for mp in model_params]
    grouped = channel_merge_layer(base32, inputs, weights, params)
    if params.expert is not None:
        out = grouped.rebuild(params.expert)
    else:
        out = sum(w * grouped.rebuild(i) for i, w in enumerate(weights)) / sum(weights)
    return finish(out, NAME, name)
