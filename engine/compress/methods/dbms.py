"""DBMS-style scalar calibration (ours): two learned scalars around any other compressor.

NOT the paper's method. DBMS (Huang et al., 2025, "Dynamic Base Model Shift for Delta
Compression") shifts the base model toward the target task *before* compressing the delta:
its abstract and figure say it first obtains a compressed base vector, then fuses it into the
base with a learned shift magnitude, and learns a second scalar for the overall scale of the
compressed delta, both cheaply on a few samples. Its method section (how the base vector is
obtained and compressed, the fusion and the objective) was not available to us: only the
abstract and the first page of the paper are in our sources, and the authors' code is not
public. We do not guess it; the name says what this is instead.

What this method does (all ours): the inner compressor compresses the *unchanged* delta
``W_ft - W_base`` with the whole byte budget; every compressed matrix is rebuilt as
``(1 + alpha) * W_base + lam * d_hat`` (``d_hat`` the inner compressor's rebuilt delta): ``alpha``
(init 0) rescales the base along itself, ``lam`` (init 1) rescales the delta. 1-D tensors and
matrices outside the compression ``scope`` (stored exactly in fp16) are not touched. The two
scalars are learned after compression with Adam (``steps``, ``lr``), matching the fine-tune's
next-token distributions (KL) at the answer positions of ``n_prompts`` prompts of the
fine-tune's zoo task (training split; ``tasks`` overrides; a model in no zoo gets every zoo
task's prompts, with a warning), or of the dev split of ``calibration_data``, the user's JSONL
file. They are stored in the manifest (8 bytes of information). The registry name stays
``dbms`` (recipes and artifacts keep working).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PrivateAttr

from engine.compress.registry import CompressParams, get_method
from engine.errors import ParameterError

NAME = "dbms"
PAPER = ("DBMS-style scalar calibration (ours: two learned scalars around a compressor; not the "
         "paper's base shift, whose method section was not available to us), after Huang et al., "
         "Dynamic Base Model Shift for Delta Compression, 2025 (arXiv:2505.11344)")
SOLVED = ()


# Parameter sets measured in bench/README.md: DBMS over Delta-CoMe with groups of 32.
PRESETS = {"small-models": {"inner": "delta_come", "inner_params": {"group_size": 32}}}


class Params(CompressParams):
    inner: str = Field("delta_dct", description="The compressor DBMS wraps.")
    inner_params: dict[str, Any] = Field(default_factory=dict, description="Its parameters.")
    tasks: list[str] | None = Field(None, description="Calibration tasks (default: the fine-tune's zoo task).")
    calibration_data: str | None = Field(None, description="A JSONL file of {prompt, answer} lines: "
                                                           "learn on its dev split instead of tasks.")
    n_prompts: int = Field(32, ge=1, le=4096, description="Calibration prompts.")
    steps: int = Field(60, ge=1, le=10000, description="Adam steps.")
    lr: float = Field(0.02, gt=0, description="Adam learning rate of the two scalars.")
    alpha: float | None = Field(None, description="Base shift (learned; set it to skip learning).")
    scale: float | None = Field(None, description="Delta scale (learned; set it to skip learning).")
    _inner: Any = PrivateAttr(None)

    def inner_method(self):
        return get_method(self.inner)

    def inner_parsed(self):
        if self._inner is None:  # decode side: sections describe themselves, nothing is solved
            self._inner = self.inner_method().params_class.model_validate(self.inner_params)
        return self._inner


def validate(params: Params, ratio: float | None) -> None:
    from engine.compress.registry import PIPELINE_FIELDS

    if params.inner == NAME:
        raise ParameterError("dbms cannot wrap itself")
    method = params.inner_method()
    pipeline = [k for k in PIPELINE_FIELDS if k in params.inner_params]
    if pipeline:
        raise ParameterError(f"dbms: inner_params.{pipeline[0]} is a pipeline option: set "
                             f"{pipeline[0]} on dbms itself")
    if method.calibrated:
        if params.inner_params.get("distill"):
            raise ParameterError("dbms learns its own scalars; wrap bitdelta with "
                                 "inner_params.distill: false")
        # the inner compressor's own calibration never runs under dbms: recorded as such
        params.inner_params = {**params.inner_params, "distill": False}
    params._inner = method.parse_params(params.inner_params, ratio)
    if (params.alpha is None) != (params.scale is None):
        raise ParameterError("dbms: give both alpha and scale, or neither (then they are learned)")
    if params.calibration_data is not None:
        if params.alpha is not None:
            raise ParameterError("dbms: calibration_data is read only when alpha and scale are "
                                 "learned (leave them unset)")
        if params.tasks is not None:
            raise ParameterError("dbms: give tasks or calibration_data, not both")


def encode(delta, budget, params: Params, ctx) -> bytes:
    return params.inner_method().module.encode(delta, budget, params.inner_parsed(), ctx)


def decode(reader, shape, params: Params, ctx) -> torch.Tensor:
    return params.inner_method().module.decode(reader, shape, params.inner_parsed(), ctx)


def needs_prepass(params: Params) -> bool:
    inner = params.inner_method().module
    return hasattr(inner, "allocate") and inner.needs_prepass(params.inner_parsed())


def prepass(delta, params: Params, ctx):
    return params.inner_method().module.prepass(delta, params.inner_parsed(), ctx)


def allocate(stats, budgets, params: Params):
    return params.inner_method().module.allocate(stats, budgets, params.inner_parsed())


def rebuild(base: torch.Tensor, delta_hat: torch.Tensor, params: Params, ctx) -> torch.Tensor:
    alpha = 0.0 if params.alpha is None else params.alpha
    scale = 1.0 if params.scale is None else params.scale
    return (1.0 + alpha) * base + scale * delta_hat


def learns(params: Params) -> bool:
    """Whether ``calibrate`` runs: the two scalars are learned unless ``alpha`` is given."""
    return params.alpha is None


def calibrate(job, params: Params) -> dict:
    if params.alpha is not None:
        return {}
    from engine.compress.calibration import distill

    alpha = torch.zeros((), device=job.device, requires_grad=True)
    scale = torch.ones((), device=job.device, requires_grad=True)
    deltas = {name: job.decode(i) for i, name in enumerate(job.matrices)}

    def weights():
        out = dict(job.base)
        for name, vec in job.vectors.items():
            out[name] = job.base[name] + vec
        for name, d_hat in deltas.items():
            out[name] = (1 + alpha) * job.base[name] + scale * d_hat
        return out

    report = distill(job, weights, [alpha, scale], n_prompts=params.n_prompts,
                     steps=params.steps, lr=params.lr)
    return {"params": {"alpha": round(float(alpha.detach()), 6), "scale": round(float(scale.detach()), 6)},
            "report": {"dbms": report}}
