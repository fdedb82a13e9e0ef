"""Plain delta scaling, a baseline: ``W = W_a + alpha * (W_f - W_a)`` on every tensor (alpha 0
is the aligned model, 1 the fine-tune). It shows what a repair buys over shrinking the whole
delta uniformly; ours, not a paper's method."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

NAME = "delta_scale"
PAPER = "baseline (ours): the aligned model plus a scaled delta"
STATS: tuple[str, ...] = ()


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Share of the fine-tune's delta kept "
                                                          "on every tensor.")


def target_names(params: Params, layout) -> set[str]:
    return set()


def repair_tensor(inputs, params: Params):
    return inputs.aligned + params.alpha * (inputs.finetuned - inputs.aligned), None
