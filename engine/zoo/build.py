"""Build the demo zoo: train every model of the plan, write folders, write ``zoo.json``.

The zoo is built in a staging folder beside ``out`` and renamed into place at the end, so
``out`` either does not exist or holds a complete zoo. Every model folder is written by
``engine.io.ModelWriter`` (fp32 safetensors, config.json, generation_config.json, tokenizer).
Seeds: each model's initialisation and data stream come from ``hash(seed, model path)``, so
the same seed (and thread count) gives the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

import engine
from engine.errors import ExportError
from engine.evaluate.scoring import Evaluator
from engine.evaluate.tasks import TASKS
from engine.io import ModelWriter
from engine.io.staging import (LOCK_NAME, make_staging_dir, owner_alive, unregister_staging,
                                write_owner_lock)
from engine.zoo.plan import FULL_ARCHS, QUICK_ARCHS, Arch, ModelPlan, zoo_plan
from engine.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer, tokenizer_files
from engine.zoo.train import train

ZOO_VERSION = 1
MANIFEST_NAME = "zoo.json"
TOKENIZER_DIR = "tokenizer"
MAX_POSITIONS = 64  # longest prompt + answer is well under this
Progress = Callable[[float, str], None]


def stage_seed(seed: int, name: str) -> int:
    """A per-model seed from the zoo seed: stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


def llama_config(arch: Arch):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        architectures=["LlamaForCausalLM"], torch_dtype="float32")


def new_model(arch: Arch, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(arch)).float()


def generation_config() -> dict:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
            "do_sample": False, "max_new_tokens": 16}


def write_model(dest: Path, model, tok_files: dict[str, bytes], manifest_extra: dict) -> None:
    config = model.config.to_dict()
    extra = dict(tok_files)
    extra["generation_config.json"] = json.dumps(generation_config(), indent=2).encode()
    with ModelWriter(dest, config=config, extra_files=extra,
                     manifest_extra={"zoo": manifest_extra}) as writer:
        for name, tensor in model.state_dict().items():
            writer.add_tensor(name, tensor.detach().to(torch.float32))


def _arch_dict(arch: Arch) -> dict:
    return {"hidden_size": arch.hidden_size, "num_hidden_layers": arch.num_hidden_layers,
            "num_attention_heads": arch.num_attention_heads,
            "intermediate_size": arch.intermediate_size}


def load_trained_model(folder: Path):
    """A model folder the zoo build wrote (a finished model of an interrupted build, or a zoo
    model to train further), read back through ``engine.io``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.io import ModelFolder

    with ModelFolder(folder, check_finite=True) as stored:
        model = LlamaForCausalLM(LlamaConfig.from_dict(stored.config)).float()
        model.load_state_dict({n: stored.get_tensor(n) for n in stored.tensor_names})
    return model.eval()


def _entry(plan: ModelPlan, arch: Arch, model, seconds: float, scores: dict, seed: int) -> dict:
    entry = {
        "path": plan.path, "family": plan.family, "role": plan.role, "task": plan.task,
        "parent": plan.parent, "seed": seed, "trained_on": dict(plan.spec.mixture),
        "steps": plan.spec.steps, "lr": plan.spec.lr, "batch_size": plan.spec.batch_size,
        "arch": _arch_dict(arch),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 2),
        "accuracy": {name: s["accuracy"] for name, s in scores["tasks"].items()},
        "n_eval": next(iter(scores["tasks"].values()))["n"],
        "perplexity": scores["perplexity"],
    }
    entry.update(dict(plan.extra))
    return entry


def _reference_merge(models: dict, tokenizer, n_eval: int) -> dict:
    """Task arithmetic of small/reverse and small/upper (lambda = 1): the merge bar."""
    base, a, b = (models[p].state_dict() for p in ("small/base", "small/reverse", "small/upper"))
    merged = {k: base[k] + (a[k] - base[k]) + (b[k] - base[k]) for k in base}
    evaluator = Evaluator(new_model_like(models["small/base"]), tokenizer,
                          ["reverse", "upper"], n_eval, 0)
    scores = evaluator.evaluate_state_dict(merged)
    return {"method": "task_arithmetic", "lambda": 1.0,
            "models": ["small/reverse", "small/upper"], "base": "small/base",
            "accuracy": {k: v["accuracy"] for k, v in scores["tasks"].items()}}


def new_model_like(model):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(model.config).float().eval()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError("zoo destination exists and is not empty", path=out)


# Fields of a model's manifest entry that must match the plan for a resumed build to reuse it.
_RESUME_KEYS = ("path", "family", "role", "task", "parent", "seed", "trained_on", "steps", "lr",
                "batch_size", "arch")


def _adopt_staging(out: Path) -> Path | None:
    """The newest staging folder of an interrupted build of ``out`` (owner dead), now ours."""
    candidates = [p for p in out.parent.glob(f".{out.name}.staging-*")
                  if p.is_dir() and not p.is_symlink() and owner_alive(p) is False]
    if not candidates:
        return None
    staging = max(candidates, key=lambda p: p.stat().st_mtime)
    write_owner_lock(staging, out)
    return staging


def _reusable(staging: Path, item: ModelPlan, expected: dict) -> dict | None:
    """The manifest entry of a model an interrupted build finished, if it is this plan's."""
    folder = staging / item.path
    try:
        manifest = json.loads((folder / "delta_workbench_manifest.json").read_text())
        entry = manifest["zoo"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(entry.get(k) != expected.get(k) for k in _RESUME_KEYS):
        return None
    return entry


def build_zoo(out: str | Path, quick: bool = False, seed: int = 0,
              progress: Progress | None = None, n_eval: int | None = None,
              resume: bool = False) -> Path:
    """Train and write the zoo into ``out`` (must not exist or be empty); returns ``out``.

    ``progress(fraction, message)`` is called as training advances (fraction in [0, 1]).
    ``n_eval``: held-out examples per task for the accuracies recorded in the manifest.
    ``resume``: adopt the staging folder of an interrupted build of ``out`` (its process gone)
    and keep every model it finished whose recorded plan (seed, steps, learning rate, data,
    architecture) is this build's, after re-reading it through the validating reader;
    the rest is trained as usual. Training is seeded per model, so the zoo is the same.
    """
    out = Path(out).absolute()
    _check_out(out)
    plan = zoo_plan(quick)
    archs = QUICK_ARCHS if quick else FULL_ARCHS
    n_eval = n_eval or (24 if quick else 128)
    report = progress or (lambda fraction, message: None)
    total_steps = sum(p.spec.steps for p in plan)
    done_steps = 0
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same staging convention as ModelWriter (owner lock inside, registered), so a build killed
    # hard is swept like any orphan export by engine.io.staging.sweep_all_staging.
    staging = (_adopt_staging(out) if resume else None) or make_staging_dir(out)
    resumed: list[str] = []
    try:
        tokenizer = build_tokenizer()
        shutil.rmtree(staging / TOKENIZER_DIR, ignore_errors=True)
        tok_files = tokenizer_files(staging / TOKENIZER_DIR)
        models, entries = {}, []
        for item in plan:
            arch = archs[item.arch]
            seed_i = stage_seed(seed, item.path)
            if resume and (staging / item.path).exists():
                expected = {"path": item.path, "family": item.family, "role": item.role,
                            "task": item.task, "parent": item.parent, "seed": seed_i,
                            "trained_on": dict(item.spec.mixture), "steps": item.spec.steps,
                            "lr": item.spec.lr, "batch_size": item.spec.batch_size,
                            "arch": _arch_dict(arch)}
                entry = _reusable(staging, item, expected)
                if entry is not None:
                    model = load_trained_model(staging / item.path)
                    models[item.path], done_steps = model, done_steps + item.spec.steps
                    entries.append(entry)
                    resumed.append(item.path)
                    report(min(0.999, done_steps / total_steps), f"{item.path}: kept (resumed)")
                    continue
                shutil.rmtree(staging / item.path)
            if item.parent is None:
                model = new_model(arch, seed_i)
            else:
                model = new_model_like(models[item.parent])
                model.load_state_dict(models[item.parent].state_dict())
            report(done_steps / total_steps, f"training {item.path}")
            every = max(1, item.spec.steps // 20)

            def on_step(step, loss, _path=item.path, _base=done_steps, _every=every):
                if step % _every == 0:
                    report(min(0.999, (_base + step) / total_steps),
                           f"training {_path}: step {step}, loss {loss:.3f}")

            t0 = time.time()
            train(model, item.spec, seed_i, on_step)
            seconds = time.time() - t0
            done_steps += item.spec.steps
            report(min(0.999, done_steps / total_steps), f"evaluating {item.path}")
            scores = Evaluator(model, tokenizer, None, n_eval, n_eval).evaluate()
            entry = _entry(item, arch, model, seconds, scores, seed_i)
            shown = ", ".join(f"{k} {v:.2f}" for k, v in entry["accuracy"].items())
            report(min(0.999, done_steps / total_steps),
                   f"{item.path} trained in {seconds:.0f} s; accuracy: {shown}")
            write_model(staging / item.path, model, tok_files, entry)
            models[item.path] = model
            entries.append(entry)
        manifest = {
            "zoo_version": ZOO_VERSION, "engine_version": engine.__version__,
            "seed": seed, "quick": quick, "dtype": "float32",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.time() - started, 1),
            "resumed_models": resumed,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "python": platform.python_version(), "tokenizer": TOKENIZER_DIR,
            "tasks": {name: task.description for name, task in TASKS.items()},
            "reference_merge": _reference_merge(models, tokenizer, n_eval),
            "models": entries,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        (staging / LOCK_NAME).unlink()
        _check_out(out)
        if out.exists():
            out.rmdir()  # empty, checked just above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        unregister_staging(staging)
    report(1.0, f"zoo written to {out}")
    return out
