"""Build models for evaluation without running any code from the checkpoint.

Weights come only through ``engine.io.ModelFolder`` (validated safetensors); the module is
built by ``from_config`` from the folder's config.json (no remote code: the reader refuses
configs that ask for it, and ``AutoConfig.for_model`` only knows built-in architectures).
The tokenizer is loaded from a private copy of the folder's vetted side files
(``engine.io.side_files.transformers_view``), never from the folder itself.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from engine.errors import ParameterError, ConfigError, DeltaWorkbenchError
from engine.evaluate.scoring import Evaluator, _load_strict
from engine.evaluate.tokenizer import VOCAB_SIZE, build_tokenizer
from engine.io import ModelFolder
from engine.io.reader import refuse_unsafe_config
from engine.io.side_files import TOKENIZER_FILES, transformers_view

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
_CACHE_LOCK = threading.Lock()
_EVALUATORS: dict[str, Evaluator] = {}
_MAX_CACHED = 4


def model_from_config(config: dict, dtype: torch.dtype = torch.float32, *, path: Path | None = None):
    """An untrained causal LM of the architecture ``config`` describes, in ``dtype``
    (``path``: the config's file, named in errors)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoModelForCausalLM

    # configs also come from artifacts and callers, not only from a vetted folder
    refuse_unsafe_config(config, path, "config")
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError("config.json has no model_type", path=path)
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map"):
        fields.pop(key, None)
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as err:
        reason = " ".join(str(err).split())  # transformers' messages span several lines
        raise ConfigError(f"cannot build a causal LM from config ({model_type}): {reason}",
                          path=path) from None
    return model.to(dtype).eval()


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The folder's tokenizer; a folder without one (e.g. a bare merge output) whose vocab
    size is the zoo's gets the zoo's character tokenizer."""
    from transformers import AutoTokenizer


    folder = Path(path)
    with transformers_view(folder) as view:
        present = [name for name in TOKENIZER_FILES if (view / name).exists()]
        if any(name in present for name in _TOKENIZER_MARKERS):
            try:
                return AutoTokenizer.from_pretrained(view, trust_remote_code=False,
                                                     local_files_only=True)
            except DeltaWorkbenchError:
                raise
            except Exception as err:  # the tokenizers library raises bare Exception on bad data
                reason = " ".join(str(err).split()) or type(err).__name__
                raise ConfigError(f"the tokenizer files ({', '.join(present)}) cannot be loaded: "
                                  f"{reason[:300]}", path=folder) from None
    if vocab_size == VOCAB_SIZE:
        return build_tokenizer()
    raise ConfigError("no tokenizer in the model folder", path=folder)


def load_model_folder(path: str | Path, dtype: torch.dtype = torch.float32,
                      base: str | Path | None = None):
    """``(model, tokenizer)`` from a safetensors model folder, or from a PEFT LoRA adapter
    folder over ``base`` (its tensors read as base + adapter; the adapter's tokenizer when it
    ships one, else the base's)."""
    from engine.lora import is_adapter_folder
    from engine.lora.finetune import AdapterFinetune

    if is_adapter_folder(path):
        if base is None:
            raise ConfigError("a LoRA adapter is evaluated over its base: give the base model",
                              path=path)
        with ModelFolder(base) as base_folder, AdapterFinetune(base_folder, path) as folder:
            model = model_from_config(folder.config, dtype, path=base_folder.path / "config.json")
            _load_strict(model, dict(folder.iter_tensors()), path=folder.path)
            vocab_size = folder.config.get("vocab_size")
        own = any((Path(path) / name).exists() for name in _TOKENIZER_MARKERS)
        return model, load_tokenizer(path if own else base, vocab_size)
    with ModelFolder(path) as folder:
        model = model_from_config(folder.config, dtype, path=folder.path / "config.json")
        _load_strict(model, dict(folder.iter_tensors()), path=folder.path)
        vocab_size = folder.config.get("vocab_size")
    return model, load_tokenizer(path, vocab_size)


def finetune_tokenizer(finetune):
    """The tokenizer of an opened fine-tune (``ModelFolder`` or LoRA ``AdapterFinetune``): its
    own folder's; an adapter folder without tokenizer files takes its base's."""
    folder = Path(finetune.path)
    if getattr(finetune, "is_adapter", False) and not any(
            (folder / name).is_file() for name in _TOKENIZER_MARKERS):
        folder = Path(finetune.base.path)
    return load_tokenizer(folder, finetune.config.get("vocab_size"))


def load_finetune(finetune, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of an opened fine-tune: a ``ModelFolder``, or a LoRA adapter over
    its base (``engine.lora.finetune.AdapterFinetune``, whose folder has no config.json): built
    from the config and loaded tensor by tensor (``base + delta`` where the adapter changes it)."""
    config_file = Path(getattr(finetune, "base", finetune).path) / "config.json"
    model = model_from_config(finetune.config, dtype, path=config_file)
    _load_strict(model, dict(finetune.iter_tensors()), path=finetune.path)
    return model, finetune_tokenizer(finetune)


def cached_evaluator(config: dict, tokenizer=None, tasks: list[str] | None = None,
                     n_per_task: int | None = None, n_generic: int | None = None) -> Evaluator:
    """An Evaluator on a model of this architecture, built once per process and reused.

    Use with ``evaluate_state_dict``: a what-if merge loads its tensors into the cached
    model instead of writing and reloading a folder. Not thread-safe while evaluating.
    """

    key = json.dumps([config, tasks, n_per_task, n_generic, id(tokenizer)], sort_keys=True,
                     default=str)
    with _CACHE_LOCK:
        if key not in _EVALUATORS:
            if tokenizer is None:
                if config.get("vocab_size") != VOCAB_SIZE:
                    raise ConfigError("a tokenizer is needed for a non-zoo vocabulary")
                tokenizer = build_tokenizer()
            if len(_EVALUATORS) >= _MAX_CACHED:
                _EVALUATORS.pop(next(iter(_EVALUATORS)))
            _EVALUATORS[key] = Evaluator(model_from_config(config), tokenizer, tasks,
                                         n_per_task, n_generic)
        return _EVALUATORS[key]


def evaluate_state_dict(state_dict: dict[str, torch.Tensor], config: dict, tokenizer=None,
                        tasks: list[str] | None = None, n_per_task: int | None = None,
                        n_generic: int | None = None) -> dict:
    """Evaluate in-memory weights of a model described by ``config`` (cached model reused)."""
    evaluator = cached_evaluator(config, tokenizer, tasks, n_per_task, n_generic)
    return evaluator.evaluate_state_dict(state_dict)


def evaluate_folder(path: str | Path, tasks: list[str] | None = None,
                    n_per_task: int | None = None, n_generic: int | None = None, *,
                    base: str | Path | None = None, eval_sets=()) -> dict:
    """Load a model folder (or an adapter over ``base``) and evaluate it: the zoo tasks (none
    when ``tasks == []``) and the user's ``eval_sets`` (``engine.evaluate.own_data``).
    A multimodal folder (a LLaVA member, a VisionFuse bundle) is scored by
    ``engine.visionfuse.evaluate_multimodal`` (vision tasks too); a vision task asked of a
    text-only model is refused, naming it."""
    from engine.visionfuse.evaluate import evaluate_multimodal, is_multimodal, refuse_vision_on_text

    if base is None and not eval_sets and is_multimodal(path):
        return evaluate_multimodal(path, tasks, n_per_task)
    refuse_vision_on_text(path, tasks)
    model, tokenizer = load_model_folder(path, base=base)
    return score_model(model, tokenizer, tasks, n_per_task, n_generic, eval_sets=eval_sets)


def score_model(model, tokenizer, tasks: list[str] | None = None, n_per_task: int | None = None,
                n_generic: int | None = None, *, eval_sets=()) -> dict:
    """``{"tasks": {...}, "perplexity": zoo generic or None}``, plus ``perplexity_sets``
    (``{stem: float}``) when text eval sets are given; an eval set's accuracy is keyed by its
    stem beside the zoo tasks."""
    if tasks is not None and len(tasks) == 0:
        result = {"tasks": {}, "perplexity": None}
    else:
        result = Evaluator(model, tokenizer, tasks, n_per_task, n_generic).evaluate()
    return add_eval_sets(result, model, tokenizer, eval_sets)


def add_eval_sets(result: dict, model, tokenizer, eval_sets) -> dict:
    """``result`` (an evaluator's) with the user's eval sets scored on the same model: each
    JSONL set's accuracy under its stem in ``tasks``, text perplexities in ``perplexity_sets``."""
    from engine.evaluate.own_data import score_sets

    if not eval_sets:
        return result
    own = score_sets(model, tokenizer, list(eval_sets))
    clash = set(own["tasks"]) & set(result["tasks"])
    if clash:
        raise ParameterError(f"eval file stem {sorted(clash)[0]!r} is also a zoo task; rename the file")
    result["tasks"].update(own["tasks"])
    result["perplexity_sets"] = own["perplexity"]
    return result
