"""Delta analysis: per-tensor spectra and statistics, pairwise similarity and conflicts,
channel clusters, and cross-scale neural-incompatibility maps.

Definitions: ``../shared/specs/analysis.md`` and each module's docstring. ``analyze`` runs
every per-tensor and pairwise metric over a base and fine-tunes, streamed, with an optional
metric cache (``cache.MetricStore``).
"""

from engine.analysis.clusters import ChannelClusters, ClusterParams, channel_clusters
from engine.analysis.run import (ENGINE_VERSION, AnalysisParams, analyze, analyze_clusters,
                                 tensor_spectrum)
from engine.analysis.similarity import PairParams, cosine_matrix, pair_metrics
from engine.analysis.spectra import SpectrumParams, compute_spectrum, randomized_svd, tensor_metrics

__all__ = ["AnalysisParams", "ChannelClusters", "ClusterParams", "ENGINE_VERSION", "PairParams",
           "SpectrumParams", "analyze", "analyze_clusters", "channel_clusters", "compute_spectrum", "cosine_matrix",
           "pair_metrics", "randomized_svd", "tensor_metrics", "tensor_spectrum"]
