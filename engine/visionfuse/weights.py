"""VisionFuse's default per-member merge weights: one rule for the command, the comparison and
the Vision fusion page."""

from __future__ import annotations


def default_weights(method: str, k: int) -> list[float]:
    """The per-member weights when none are given: 1/k each for task arithmetic (ours: the mean
    of the members' LM deltas), else the method's own starting weight.

    The members of a family share most of their instruction tuning, so their deltas are
    aligned; the sum (lambda 1 each) counts that shared part k times and overshoots: on the zoo
    every recipe of the VisionFuse ablation in bench/README.md fuses to about 0 exact with the
    sum, and the mergeable one reaches 0.78 with the mean."""
    from engine.merge.registry import get_method

    if method == "task_arithmetic":
        return [1.0 / k] * k
    return [get_method(method).starting_weight(k)] * k
