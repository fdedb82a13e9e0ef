"""VisionFuse (Chen et al., arXiv:2412.01289): training-free fusion of multimodal LLMs that
share one pretrained LM.

Only the members' language models are merged: each member's LM delta tau_i = theta_i - theta_0
over the shared base theta_0 goes through a registered merge method (``engine.merge``; the
default is task arithmetic, theta_0 + sum_i lambda_i tau_i, with lambda_i = 1/k: see
``default_weights``). Each member's vision encoder and projector are kept as they are; the
fused model reads the concatenation of their visual tokens, in member order, before the text.
Nothing is trained.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from engine.errors import ParameterError
from engine.visionfuse.bundle import MANIFEST, encoder_parts, manifest_json
from engine.visionfuse.weights import default_weights
from engine.visionfuse.members import (Member, check_member, check_tokenizers, open_member,
                                       read_base)

DEFAULT_METHOD = "task_arithmetic"


def merge_language_models(base_state: dict[str, torch.Tensor], members: list[Member],
                          method: str = DEFAULT_METHOD, params: dict | None = None,
                          weights: list[float] | None = None, *, seed: int = 0,
                          device=None) -> dict[str, torch.Tensor]:
    """The members' LMs merged over the base with the house's merge path
    (``engine.merge.executor.merge_state_dicts``); ``weights``: per-member weight (lambda_i)."""
    from engine.merge.executor import merge_state_dicts
    from engine.merge.registry import get_method

    spec = get_method(method)
    if not spec.requires_base and not spec.optional_base:
        raise ParameterError(f"merge method {method!r} takes no base; VisionFuse merges the "
                             "members' deltas over their shared LM")
    if weights is not None and len(weights) != len(members):
        raise ParameterError(f"{len(weights)} weights for {len(members)} members")
    if weights is None:
        weights = default_weights(method, len(members))
    model_params = [{"weight": float(w)} for w in weights]
    num_layers = sum(1 for k in base_state if k.endswith("input_layernorm.weight")) or None
    return merge_state_dicts(method, base_state, [m.lm_state for m in members], model_params,
                             dict(params or {}), seed=seed, num_layers=num_layers, device=device,
                             out_dtype=torch.float32)


def open_inputs(base: str | Path, models: list[str | Path]):
    """``(base config, base state, members)``, every check done before anything is merged."""
    if len(models) < 2:
        raise ParameterError("VisionFuse fuses at least two members")
    base_path = Path(base)
    base_config, base_state = read_base(base_path)
    members = [open_member(m) for m in models]
    for member in members:
        check_member(member, base_config, base_state, base_path)
    check_tokenizers(members, base_path)
    return base_config, base_state, members


def fuse(base: str | Path, models: list[str | Path], out: str | Path,
         method: str = DEFAULT_METHOD, params: dict | None = None,
         weights: list[float] | None = None, *, seed: int = 0, device=None) -> dict:
    """Write the fused model of ``models`` (LLaVA members over the text LM ``base``) to ``out``
    (must not exist or be empty), atomically; returns a summary."""
    from engine.io import ModelWriter
    from engine.io.side_files import TOKENIZER_FILES, read_side_file
    from engine.io.staging import (check_destination, discard_staging,
                                   make_staging_with_parents)
    from engine.zoo.mllm import member_files

    started = time.perf_counter()
    out = Path(out).absolute()
    check_destination(out, [base, *models])
    base_config, base_state, members = open_inputs(base, models)
    if weights is None:
        weights = default_weights(method, len(members))
    merged = merge_language_models(base_state, members, method, params, weights, seed=seed,
                                   device=device)
    tokenizer = {n: d for n in TOKENIZER_FILES
                 if (d := read_side_file(base, n)) is not None}
    staging, created = make_staging_with_parents(out)
    try:
        config = {k: v for k, v in base_config.items()}
        with ModelWriter(staging / "lm", config=config, extra_files=tokenizer) as writer:
            for name, tensor in merged.items():
                writer.add_tensor(name, tensor.contiguous())
        encoders = []
        for i, member in enumerate(members):
            folder = staging / "encoders" / str(i)
            folder.parent.mkdir(exist_ok=True)
            with ModelWriter(folder, config=member.model.config.to_dict(),
                             extra_files=member_files(member.view)) as writer:
                for name, tensor in encoder_parts(member.model).items():
                    writer.add_tensor(name, tensor.detach().float().contiguous())
            encoders.append({"folder": f"encoders/{i}", "source": member.path.name,
                             "n_tokens": member.model.config.image_seq_length,
                             "view": member.view.to_dict()})
        merge = {"method": method, "params": dict(params or {}),
                 "weights": None if weights is None else [float(w) for w in weights],
                 "base": Path(base).name, "members": [m.path.name for m in members],
                 "merged": "language model only (model.language_model.* and lm_head)"}
        (staging / MANIFEST).write_bytes(manifest_json(encoders, merge))
        from engine.io.staging import LOCK_NAME

        (staging / LOCK_NAME).unlink(missing_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
        from engine.io.staging import unregister_staging

        unregister_staging(staging)
        staging = None
    finally:
        if staging is not None:
            discard_staging(staging, created)
    return {"out": str(out), "method": method, "members": [m.path.name for m in members],
            "visual_tokens": sum(e["n_tokens"] for e in encoders),
            "seconds": round(time.perf_counter() - started, 3)}
