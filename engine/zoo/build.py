"""Build the demo zoo: train every model of the plan, write folders, write ``zoo.json``.

Models are trained into a staging folder beside ``out`` and published one family at a time,
in plan order (the small family first), so the app has models to show minutes into a build:

- the first finished family appears with ``out`` itself: ``out`` is assembled in the staging
  folder (tokenizer, the family, ``zoo.json``) and renamed into place in one step, so ``out``
  either does not exist or holds a readable zoo;
- each later family is renamed from the staging folder into ``out`` in one step (complete and
  verified: every tensor read back through the validating reader equals the trained one), then
  ``zoo.json`` is rewritten atomically (temporary file, fsync, rename);
- until the last family, ``zoo.json`` says ``"complete": false`` and lists the models still to
  come under ``"pending"``; ``"models"`` lists only published ones.

A killed build leaves ``out`` as a valid partial zoo (plus, beside it, a staging folder with
the models it finished of the family in progress, which ``--resume`` adopts and the start-up
sweep otherwise removes); a model is never visible half-written. Every model folder is written
by ``engine.io.ModelWriter`` (fp32 safetensors, config.json, generation_config.json,
tokenizer). Seeds: each model's initialisation and data stream come from
``hash(seed, model path)``, so the same seed (and thread count) gives the same tensors.
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
from engine.io.reader import ModelFolder
from engine.io.staging import make_staging_dir, owner_alive, unregister_staging, write_owner_lock
from engine.io.writer import _fsync_dir, _write_bytes
from engine.zoo.plan import FULL_ARCHS, MLLM_FAMILY, QUICK_ARCHS, Arch, ModelPlan, zoo_plan
from engine.evaluate.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer, tokenizer_files
from engine.zoo.train import train

ZOO_VERSION = 1
MANIFEST_NAME = "zoo.json"
TOKENIZER_DIR = "tokenizer"
MAX_POSITIONS = 64  # longest prompt + answer is well under this
PUBLISH_DIR = "publish"  # inside the staging folder: ``out`` assembled for its first rename
MANIFEST_TMP = f".{MANIFEST_NAME}.tmp"  # fixed name: a kill mid-write leaves one file to replace
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


def write_model(dest: Path, model, tok_files: dict[str, bytes], manifest_extra: dict,
                more_files: dict[str, bytes] | None = None) -> None:
    config = model.config.to_dict()
    extra = {**tok_files, **(more_files or {})}
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

    if (_stored_entry(folder) or {}).get("family") == MLLM_FAMILY:
        from engine.zoo.mllm import load_member

        return load_member(folder)[0]
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


_REFERENCE_MODELS = ("small/base", "small/reverse", "small/upper")


def _reference_merge(models: dict, tokenizer, n_eval: int) -> dict:
    """Task arithmetic of small/reverse and small/upper (lambda = 1): the merge bar."""
    base, a, b = (models[p].state_dict() for p in _REFERENCE_MODELS)
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


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _check_out(out: Path, resume: bool) -> dict | None:
    """The manifest of the zoo ``out`` holds when resuming (complete or not); None when ``out``
    is missing or empty (a fresh build). Anything else is refused."""
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink() or not out.is_dir():
        raise ExportError("zoo destination exists and is not a folder", path=out)
    if not any(out.iterdir()):
        return None
    from engine.zoo import load_manifest

    manifest_file = out / MANIFEST_NAME
    if not manifest_file.is_file() or manifest_file.is_symlink():
        raise ExportError("zoo destination exists and is not empty", path=out)
    manifest = load_manifest(out)  # a broken zoo.json is a named error, whatever we do
    if resume:
        return manifest
    if manifest.get("complete", True):
        raise ExportError("zoo destination exists and is not empty", path=out)
    raise ExportError("zoo destination holds an unfinished build (zoo.json says complete: "
                      "false); continue it with --resume or build into an empty folder", path=out)


# Fields of a model's manifest entry that must match the plan for a resumed build to reuse it.
_RESUME_KEYS = ("path", "family", "role", "task", "parent", "seed", "trained_on", "steps", "lr",
                "batch_size", "arch")


def _adopt_staging(out: Path) -> Path | None:
    """The newest staging folder of an interrupted build of ``out`` (owner dead), now ours.

    A build killed while assembling ``out`` for its first rename left that family in
    ``PUBLISH_DIR``: it goes back where the models of the family in progress are looked for."""
    candidates = [p for p in out.parent.glob(f".{out.name}.staging-*")
                  if p.is_dir() and not p.is_symlink() and owner_alive(p) is False]
    if not candidates:
        return None
    staging = max(candidates, key=lambda p: p.stat().st_mtime)
    write_owner_lock(staging, out)
    assembled = staging / PUBLISH_DIR
    if assembled.is_dir() and not assembled.is_symlink():
        for family in assembled.iterdir():
            if family.is_dir() and not family.is_symlink() and family.name != TOKENIZER_DIR \
                    and not (staging / family.name).exists():
                os.replace(family, staging / family.name)
        shutil.rmtree(assembled)
    return staging


def _stored_entry(folder: Path) -> dict | None:
    """The zoo entry a model folder's own manifest records (what the build wrote), or None."""
    try:
        entry = json.loads((folder / "delta_workbench_manifest.json").read_text())["zoo"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry if isinstance(entry, dict) else None


def _reusable(staging: Path, item: ModelPlan, expected: dict) -> dict | None:
    """The manifest entry of a model an interrupted build finished, if it is this plan's."""
    entry = _stored_entry(staging / item.path)
    if entry is None or any(entry.get(k) != expected.get(k) for k in _RESUME_KEYS):
        return None
    return entry


def _families(plan: list[ModelPlan]) -> list[tuple[str, list[ModelPlan]]]:
    """The plan cut into families, in plan order; a family's models are contiguous in it."""
    families: list[tuple[str, list[ModelPlan]]] = []
    for item in plan:
        if families and families[-1][0] == item.family:
            families[-1][1].append(item)
        elif any(name == item.family for name, _ in families):
            raise ValueError(f"zoo plan: family {item.family!r} is not contiguous")
        else:
            families.append((item.family, [item]))
    return families


def _verify_family(root: Path, items: list[ModelPlan], models: dict) -> None:
    """Before a family is published: every model folder reads back through the validating
    reader, tensor for tensor equal to the model trained, with its manifest entry."""
    for item in items:
        folder = root / item.path
        if (_stored_entry(folder) or {}).get("path") != item.path:
            raise ExportError(f"zoo model {item.path} has no manifest entry", path=folder)
        state = models[item.path].state_dict()
        with ModelFolder(folder, check_finite=True) as stored:
            if sorted(stored.tensor_names) != sorted(state):
                raise ExportError(f"zoo model {item.path}: tensors written differ from the "
                                  "model trained", path=folder)
            for name in stored.tensor_names:
                if not torch.equal(stored.get_tensor(name), state[name].detach().float()):
                    raise ExportError(f"zoo model {item.path}: tensor {name} read back differs "
                                      "from the one trained", path=folder)


def _write_manifest(folder: Path, manifest: dict) -> None:
    """``zoo.json`` replaced in one step (temporary file fsynced, renamed, folder fsynced), so a
    reader sees the old manifest or the new one, never a torn one."""
    tmp = folder / MANIFEST_TMP
    _write_bytes(tmp, json.dumps(manifest, indent=2).encode())
    os.replace(tmp, folder / MANIFEST_NAME)
    _fsync_dir(folder)


def _publish(staging: Path, out: Path, family: str, manifest: dict) -> None:
    """Move a finished family from the staging folder into ``out``, then the manifest."""
    if out.is_dir() and (out / MANIFEST_NAME).is_file():
        os.replace(staging / family, out / family)
        _fsync_dir(out)
        _write_manifest(out, manifest)
        return
    # the first family: out appears in one rename, with its tokenizer and manifest
    assembled = staging / PUBLISH_DIR
    shutil.rmtree(assembled, ignore_errors=True)
    assembled.mkdir()
    os.replace(staging / TOKENIZER_DIR, assembled / TOKENIZER_DIR)
    os.replace(staging / family, assembled / family)
    _write_manifest(assembled, manifest)
    if _is_empty_dir(out):
        out.rmdir()  # an empty destination the user made; rename cannot replace it otherwise
    os.replace(assembled, out)
    _fsync_dir(out.parent)


def build_zoo(out: str | Path, quick: bool = False, seed: int = 0,
              progress: Progress | None = None, n_eval: int | None = None,
              resume: bool = False) -> Path:
    """Train and write the zoo into ``out`` (must not exist or be empty); returns ``out``.

    ``progress(fraction, message)`` is called as training advances (fraction in [0, 1]); a
    message starting with "published" follows each family made visible in ``out``.
    ``n_eval``: held-out examples per task for the accuracies recorded in the manifest.
    ``resume``: continue an interrupted build of ``out``: keep the families it published (which
    must be of this plan: same seed, steps, learning rate, data, architecture) and adopt its
    staging folder (its process gone), keeping every model of the family in progress whose
    recorded plan is this build's, after re-reading it through the validating reader; the rest
    is trained as usual. Training is seeded per model, so the zoo is the same. Resuming a
    complete zoo returns it unchanged.
    """
    out = Path(out).absolute()
    partial = _check_out(out, resume)
    if partial is not None and (partial.get("quick") is not quick or partial.get("seed") != seed):
        raise ExportError(f"the zoo was started with quick={partial.get('quick')}, "
                          f"seed={partial.get('seed')}; resume it with the same settings",
                          path=out)
    if partial is not None and partial.get("complete", True):
        (progress or (lambda fraction, message: None))(1.0, f"zoo already complete in {out}")
        return out
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
    published_after: dict[str, float] = {}
    reference = None
    try:
        listed = set()
        if partial is not None:
            (out / MANIFEST_TMP).unlink(missing_ok=True)  # a rewrite the kill interrupted
            listed = {m["path"] for m in partial["models"]}
        tokenizer = build_tokenizer()
        shutil.rmtree(staging / TOKENIZER_DIR, ignore_errors=True)
        tok_files = tokenizer_files(staging / TOKENIZER_DIR)
        models, entries = {}, []
        families = _families(plan)
        for index, (family, items) in enumerate(families):
            # a family renamed into out before the kill (listed in zoo.json or not: the kill
            # may have come between the rename and the manifest) is kept whole or refused
            published = partial is not None and (out / family).is_dir()
            for item in items:
                arch = archs[item.arch]
                seed_i = stage_seed(seed, item.path)
                where = out if published else staging
                if published or (resume and (staging / item.path).exists()):
                    expected = {"path": item.path, "family": item.family, "role": item.role,
                                "task": item.task, "parent": item.parent, "seed": seed_i,
                                "trained_on": dict(item.spec.mixture), "steps": item.spec.steps,
                                "lr": item.spec.lr, "batch_size": item.spec.batch_size,
                                "arch": _arch_dict(arch)}
                    entry = _reusable(where, item, expected)
                    if entry is not None:
                        model = load_trained_model(where / item.path)
                        models[item.path], done_steps = model, done_steps + item.spec.steps
                        entries.append(entry)
                        resumed.append(item.path)
                        report(min(0.999, done_steps / total_steps), f"{item.path}: kept (resumed)")
                        continue
                    if published:
                        raise ExportError(f"published zoo model {item.path} is missing or was "
                                          "trained with another plan; build into an empty folder",
                                          path=out / item.path)
                    shutil.rmtree(staging / item.path)
                if item.family == MLLM_FAMILY:
                    model = None  # a LLaVA member: built and trained below, from its parent LM
                elif item.parent is None:
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
                more_files = None
                if item.family == MLLM_FAMILY:
                    from engine.zoo import mllm

                    model = mllm.build_member(item, models[item.parent], seed_i, on_step,
                                              family_seed=stage_seed(seed, mllm.DATA_SEED_NAME))
                else:
                    train(model, item.spec, seed_i, on_step)
                seconds = time.time() - t0
                done_steps += item.spec.steps
                report(min(0.999, done_steps / total_steps), f"evaluating {item.path}")
                if item.family == MLLM_FAMILY:
                    view = mllm.plan_view(dict(item.extra))
                    scores = mllm.score_member(model, view, tokenizer, n_eval)
                    more_files = mllm.member_files(view)
                else:
                    scores = Evaluator(model, tokenizer, None, n_eval, n_eval).evaluate()
                entry = _entry(item, arch, model, seconds, scores, seed_i)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in entry["accuracy"].items())
                report(min(0.999, done_steps / total_steps),
                       f"{item.path} trained in {seconds:.0f} s; accuracy: {shown}")
                write_model(staging / item.path, model, tok_files, entry, more_files)
                models[item.path] = model
                entries.append(entry)
            if reference is None and all(p in models for p in _REFERENCE_MODELS):
                reference = _reference_merge(models, tokenizer, n_eval)
            complete = index == len(families) - 1
            pending = [p.path for _, later in families[index + 1:] for p in later]
            if not published:
                _verify_family(staging, items, models)
                published_after[family] = round(time.time() - started, 1)
            manifest = {
                "zoo_version": ZOO_VERSION, "engine_version": engine.__version__,
                "seed": seed, "quick": quick, "dtype": "float32",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": complete, "pending": pending,
                "build_seconds": round(time.time() - started, 1),
                "published_after_seconds": dict(published_after),
                "resumed_models": list(resumed),
                "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                "python": platform.python_version(), "tokenizer": TOKENIZER_DIR,
                "tasks": {name: task.description for name, task in TASKS.items()},
                **({"reference_merge": reference} if reference is not None else {}),
                "models": list(entries),
            }
            if not published:
                _publish(staging, out, family, manifest)
            elif complete or any(m["path"] not in listed for m in manifest["models"]):
                _write_manifest(out, manifest)  # kept as it was; zoo.json is behind or done
            else:
                continue  # a family zoo.json already lists: nothing to rewrite
            partial = manifest
            listed = {m["path"] for m in manifest["models"]}
            report(min(0.999, done_steps / total_steps) if not complete else 1.0,
                   f"published {family} ({len(items)} models) after "
                   f"{time.time() - started:.0f} s"
                   + ("" if complete else f"; still to come: {len(pending)} models"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        unregister_staging(staging)
    report(1.0, f"zoo written to {out}")
    return out
