"""Channel clusters of one layer across experts: the clustering Channel Merging uses.

A channel is an output row of a weight (first dimension). For every channel position c, the N
experts' rows at c (task vectors, as the paper clusters delta parameters; or weights) are
L2-normalised and clustered by cosine into at most G groups with the very functions of
``engine.merge.methods.channel_merging`` (average-linkage agglomerative, or spherical k-means),
so this view shows exactly what that merge method would store. Group ids are per channel and
numbered by their lowest expert (expert 0 is always in group 0).

Summary of one layer (``ChannelClusters.summary()``):

- ``group_sizes[g]``: expert-channels in group g, over all channels; ``size_patterns``: how many
  channels split the experts as e.g. "3+1" or "2+2" (sizes sorted, descending);
- ``expert_group_counts[i][g]``: channels of expert i that land in group g;
- ``co_assignment[i][j]``: fraction of channels where experts i and j share a group;
- ``mean_cosine[i][j]``: row cosine between experts i and j, averaged over channels;
- ``within_group_cosine`` / ``between_group_cosine``: mean cosine over pairs of rows of one
  channel in the same / in different groups (None when there is no such pair);
- ``stored_rows`` (non-empty groups summed over channels) and ``storage_fraction`` =
  stored_rows / (N * C): what Channel Merging keeps, as a fraction of the N experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import IncompatibleModelsError, ParameterError
from engine.merge.methods.channel_merging import agglomerative, channel_rows, spherical_kmeans


class ClusterParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_groups: int = Field(2, ge=1, le=255, description="Groups per channel position (G).")
    clustering: Literal["agglomerative", "kmeans"] = Field("agglomerative", description="Clustering of normalised rows.")
    kmeans_iters: int = Field(20, ge=1, le=1000, description="Maximum k-means iterations.")


@dataclass
class ChannelClusters:
    labels: torch.Tensor  # (N, C) long: group of expert i's channel c
    cosine: torch.Tensor  # (C, N, N) float32 row cosines
    num_groups: int

    @property
    def num_experts(self) -> int:
        return self.labels.shape[0]

    @property
    def num_channels(self) -> int:
        return self.labels.shape[1]

    def summary(self, include_labels: bool = False) -> dict:
        n, c, g = self.num_experts, self.num_channels, self.num_groups
        labels = self.labels.cpu()
        onehot = F.one_hot(labels, g)  # (N, C, G)
        per_channel = onehot.sum(dim=0)  # (C, G) group sizes per channel
        patterns = Counter("+".join(str(int(s)) for s in sorted(row.tolist(), reverse=True) if s > 0)
                           for row in per_channel)
        same = (labels.unsqueeze(0) == labels.unsqueeze(1))  # (N, N, C)
        cos = self.cosine.cpu().double().permute(1, 2, 0)  # (N, N, C)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1).unsqueeze(2).expand(n, n, c)
        within_mask, between_mask = same & upper, (~same) & upper
        within = float(cos[within_mask].mean()) if bool(within_mask.any()) else None
        between = float(cos[between_mask].mean()) if bool(between_mask.any()) else None
        stored = int((per_channel > 0).sum())
        out = {
            "num_experts": n,
            "num_channels": c,
            "num_groups": g,
            "group_sizes": onehot.sum(dim=(0, 1)).tolist(),
            "size_patterns": dict(patterns.most_common()),
            "expert_group_counts": onehot.sum(dim=1).tolist(),
            "co_assignment": same.double().mean(dim=2).tolist(),
            "mean_cosine": cos.mean(dim=2).tolist(),
            "within_group_cosine": within,
            "between_group_cosine": between,
            "stored_rows": stored,
            "storage_fraction": stored / (n * c) if n * c else 0.0,
        }
        if include_labels:
            out["labels"] = labels.tolist()
        return out


def channel_clusters(tensors: Sequence[torch.Tensor], params: ClusterParams | None = None, *,
                     base: torch.Tensor | None = None, name: str | None = None) -> ChannelClusters:
    """Cluster one layer's channels across N experts (task vectors when ``base`` is given,
    otherwise the tensors as they are)."""
    params = params or ClusterParams()
    if len(tensors) < 1:
        raise ParameterError("channel clusters need at least one expert", tensor=name)
    shape = tuple(tensors[0].shape)
    for t in tensors[1:]:
        if tuple(t.shape) != shape:
            raise IncompatibleModelsError(f"expert shapes differ: {tuple(t.shape)} != {shape}", tensor=name)
    if base is not None and tuple(base.shape) != shape:
        raise IncompatibleModelsError(f"base shape {tuple(base.shape)} != {shape}", tensor=name)
    x = torch.stack([channel_rows(t.float()) for t in tensors])  # (N, C, D)
    if base is not None:
        x = x - channel_rows(base.float()).unsqueeze(0)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    n, c = x.shape[0], x.shape[1]
    groups = min(params.num_groups, n)
    feats = F.normalize(x.transpose(0, 1), dim=2)  # (C, N, D) unit rows (zero rows stay zero)
    sim = feats @ feats.transpose(1, 2)  # (C, N, N)
    if groups == n:
        labels = torch.arange(n, device=x.device).expand(c, n)
    elif groups == 1:
        labels = torch.zeros(c, n, dtype=torch.long, device=x.device)
    elif params.clustering == "agglomerative":
        labels = agglomerative(sim, groups)
    else:
        labels = spherical_kmeans(feats, groups, params.kmeans_iters)
    return ChannelClusters(labels=labels.T.contiguous().long(), cosine=sim, num_groups=groups)
