"""RESTA-style safety-vector addition (Bhardwaj et al., "Language Models are Homer Simpson!
Safety Re-Alignment of Fine-tuned Language Models through Task Arithmetic", ACL 2024,
arXiv:2402.11746): ``W = W_f + beta * v`` on every tensor, with the safety vector
``v = W_a - W_u`` (aligned minus unaligned). A baseline for Safe Delta and IRR: no data, no
selection. The paper's optional DARE step on the fine-tune's delta is not applied here.
``safety_vector: alignment_delta`` is the labelled fallback of ``engine.repair.irr``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

NAME = "resta"
PAPER = ("Bhardwaj et al., Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned "
         "Language Models through Task Arithmetic, ACL 2024 (arXiv:2402.11746)")
STATS = ("safety_vector",)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    beta: float = Field(1.0, ge=0.0, le=10.0, description="Scale of the added safety vector.")
    safety_vector: Literal["unaligned", "alignment_delta"] = Field(
        "unaligned", description="v = aligned - unaligned; 'alignment_delta' (ours, a "
                                 "fallback): v = aligned - the aligned model's own base.")


def target_names(params: Params, layout) -> set[str]:
    return set()


def repair_tensor(inputs, params: Params):
    return inputs.finetuned + params.beta * inputs.safety_vector, None
