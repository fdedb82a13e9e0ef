"""In-memory what-if merges: merge zoo models in RAM and score the result, writing nothing.

For the app's sliders: a ``WhatIfSession`` loads the base and fine-tunes once (fp32 state
dicts, through ``engine.io.ModelFolder``), builds one ``Evaluator`` (held-out sets tokenized
once, one model object reused), and then each ``evaluate(method, model_params, params)`` call
merges with the same per-tensor code as ``run_merge`` (``MergeSpec.merge_tensor``) and loads the
result into the reused model. fisher/regmean statistics are computed once per calibration
setting and cached in the session.

``what_if(base_dir, finetune_dirs, method, ...)`` does the same through a small process-wide
cache of sessions (keyed by the folders and their files' sizes and modification times).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.compat import require_compatible
from engine.device import resolve_device
from engine.errors import ParameterError
from engine.io import ModelFolder
from engine.evaluate.own_data import heldout_sets
from engine.lora.finetune import open_finetune
from engine.merge.executor import merge_state_dicts
from engine.merge.registry import get_method
from engine.merge.spec import MergeSpec
from engine.task_vectors import check_finite, read_model_tensor


def _load_fp32(folder: ModelFolder, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The folder's tensors under the layout's names, fp32; a tied head reads the embedding."""
    out = {}
    for name in names:
        tensor = read_model_tensor(folder, name)
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        tensor = tensor.to(torch.float32)
        check_finite(tensor, folder, name, "what-if refused")
        out[name] = tensor
    return out


class WhatIfSession:
    """Base + fine-tunes held in RAM as fp32 state dicts, and a reusable evaluator.

    ``tasks``, ``n_per_task``, ``n_generic``: what the evaluator scores (defaults: every zoo
    task, the evaluator's default sizes; ``n_generic=0`` skips perplexity; ``tasks=[]`` scores no
    zoo task). ``eval_files``: the user's own JSONL/text files (``engine.evaluate.own_data``),
    scored on their held-out half beside the zoo tasks: a JSONL file's accuracy under its stem
    in ``tasks``, a text file's perplexity under its stem in ``perplexity_sets``. A fine-tune
    may be a LoRA adapter folder (read over the base). ``allowed_roots``: where calibration
    data files (``calibration: {data: FILE}``) must lie (the app's roots; None: any file, as on
    the command line).
    """

    def __init__(self, base_dir: str | Path, finetune_dirs: Sequence[str | Path], *,
                 tasks: list[str] | None = None, n_per_task: int | None = None,
                 n_generic: int | None = None, device: torch.device | str | None = None,
                 eval_files: Sequence[str | Path] = (),
                 allowed_roots: Sequence[str | Path] | None = None,
                 split: str = "heldout", report_n: int | None = None):
        from engine.evaluate.loading import load_tokenizer, model_from_config
        from engine.evaluate.scoring import DEFAULT_N_PER_TASK, Evaluator

        if not finetune_dirs:
            raise ParameterError("a what-if merge needs at least one fine-tuned model")
        self.base_dir = Path(base_dir)
        self.finetune_dirs = [Path(d) for d in finetune_dirs]
        self.device = resolve_device(device)
        if split not in ("heldout", "dev"):
            raise ParameterError(f"split must be 'heldout' or 'dev', got {split!r}")
        self.split = split
        self.eval_sets = heldout_sets(eval_files, tasks, split=split)
        self.allowed_roots = list(allowed_roots) if allowed_roots is not None else None
        with ModelFolder(self.base_dir) as base:
            finetunes = []
            try:
                finetunes.extend(open_finetune(d, base) for d in self.finetune_dirs)
                require_compatible(base, [f for f in finetunes], vocab_policy="refuse")
                self.names = list(base.tensor_names)
                self.config = dict(base.config)
                self.base = _load_fp32(base, self.names)
                self.finetunes = [_load_fp32(f, self.names) for f in finetunes]
            finally:
                for f in finetunes:
                    f.close()
        self.num_layers = self.config.get("num_hidden_layers", self.config.get("n_layer"))
        self.tokenizer = load_tokenizer(self.base_dir, self.config.get("vocab_size"))
        self.model = model_from_config(self.config)
        # tasks=[]: no zoo task (a model that is not the zoo's, scored on the user's files only)
        # dev: skip the examples a held-out report scores (report_n, default the evaluator's n)
        skip = 0 if split == "heldout" else int(report_n if report_n is not None
                                                  else DEFAULT_N_PER_TASK)
        self.evaluator = (Evaluator(self.model, self.tokenizer, tasks, n_per_task, n_generic,
                                    skip=skip)
                          if tasks is None or len(tasks) > 0 else None)
        if self.evaluator is None and not self.eval_sets:
            raise ParameterError("nothing to score: no zoo task and no eval file")
        self._stats: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ merging
    def spec(self, method: str, model_params: Sequence[Mapping[str, Any] | None] | None = None,
             params: Mapping[str, Any] | None = None, *, seed: int = 0) -> MergeSpec:
        n = len(self.finetunes)
        model_params = list(model_params) if model_params is not None else [{}] * n
        if len(model_params) != n:
            raise ParameterError(f"{len(model_params)} per-model parameter sets for {n} fine-tunes")
        return MergeSpec.build(method, [dict(params or {})], [dict(m or {}) for m in model_params],
                               num_layers=self.num_layers, seed=seed)

    def merge(self, method: str, model_params: Sequence[Mapping[str, Any] | None] | None = None,
              params: Mapping[str, Any] | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """The merged fp32 state dict (nothing written)."""
        spec = self.spec(method, model_params, params, seed=seed)
        return self._merge(spec)

    def _merge(self, spec: MergeSpec) -> dict[str, torch.Tensor]:
        """As run_merge with ``base_model`` = the base and ``models`` = the fine-tunes."""
        provider = self._stats_provider(spec) if spec.method.stats is not None else None
        return merge_state_dicts(spec.method.name, self.base, self.finetunes, [], spec=spec,
                                 device=self.device, stats_provider=provider,
                                 out_dtype=torch.float32)

    def _stats_provider(self, spec: MergeSpec):
        from engine.merge.calibration import (CalibrationStats, calibration_sources,
                                              model_statistics, source_key)
        from engine.evaluate.loading import model_from_config
        from engine.evaluate.scoring import _load_strict

        sources, settings, notes = calibration_sources(spec, self.finetune_dirs, self._resolve_data)
        spec.warnings.extend(note for note in notes if note not in spec.warnings)
        kind = spec.method.stats
        key = repr((kind, [s.model_dump() for s in settings], [source_key(s) for s in sources]))
        if key not in self._stats:
            model = model_from_config(self.config)
            per_model = []
            for state, folder, source, setting in zip(self.finetunes, self.finetune_dirs, sources,
                                                      settings):
                _load_strict(model, state, path=folder)
                per_model.append(model_statistics(kind, folder, source, setting, model=model,
                                                  tokenizer=self.tokenizer))
            self._stats[key] = CalibrationStats(kind, per_model, shape_of=self.base.__getitem__)
        return self._stats[key]

    def _resolve_data(self, ref: str, index: int | None) -> tuple[Path, str]:
        from engine.recipe import resolve_data_ref

        key = ("parameters.calibration.data" if index is None
               else f"models[{index}].parameters.calibration.data")
        return resolve_data_ref(ref, key=key, allowed_roots=self.allowed_roots), f"parameter {key}"

    # ------------------------------------------------------------------ scoring
    def evaluate_state(self, state: Mapping[str, torch.Tensor]) -> dict:
        from engine.evaluate.loading import add_eval_sets
        from engine.evaluate.scoring import _load_strict

        with self._lock:
            if self.evaluator is not None:
                result = self.evaluator.evaluate_state_dict(dict(state))
            else:
                _load_strict(self.model, dict(state))
                result = {"tasks": {}, "perplexity": None}
            return add_eval_sets(result, self.model, self.tokenizer, self.eval_sets)

    def evaluate(self, method: str, model_params: Sequence[Mapping[str, Any] | None] | None = None,
                 params: Mapping[str, Any] | None = None, *, seed: int = 0) -> dict:
        """Merge in memory and score: the evaluator's result plus ``seconds`` (merge, evaluate)
        and ``warnings`` (parameters ignored)."""
        started = time.perf_counter()
        spec = self.spec(method, model_params, params, seed=seed)
        return self.evaluate_spec(spec, started=started)

    def evaluate_spec(self, spec: MergeSpec, *, started: float | None = None) -> dict:
        """As ``evaluate``, for a spec built elsewhere (a recipe's scopes: ``engine.tune``)."""
        started = time.perf_counter() if started is None else started
        merged = self._merge(spec)
        merged_at = time.perf_counter()
        result = self.evaluate_state(merged)
        done = time.perf_counter()
        result["seconds"] = {"merge": round(merged_at - started, 4),
                             "evaluate": round(done - merged_at, 4)}
        result["warnings"] = list(spec.warnings)
        return result

    def evaluate_input(self, which: int | str = "base") -> dict:
        """Score the base (``'base'``) or fine-tune ``which`` unmerged, for comparison."""
        state = self.base if which == "base" else self.finetunes[int(which)]
        return self.evaluate_state(state)


# ---------------------------------------------------------------------- cached sessions
_SESSIONS: OrderedDict[str, WhatIfSession] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_MAX_SESSIONS = 2


def _fingerprint(folder: Path) -> list:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".json"))
    return [str(Path(folder).resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                            for p in files]


def _file_print(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def get_session(base_dir: str | Path, finetune_dirs: Sequence[str | Path], **options) -> WhatIfSession:
    """A cached session for these folders (rebuilt when a file changed); keeps the last two."""
    files = [_file_print(Path(p)) for p in options.get("eval_files", ())]
    key = repr([_fingerprint(Path(base_dir)), [_fingerprint(Path(d)) for d in finetune_dirs], files,
                sorted(options.items(), key=lambda kv: kv[0])])
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None:
            _SESSIONS.move_to_end(key)
            return session
    session = WhatIfSession(base_dir, finetune_dirs, **options)
    with _SESSIONS_LOCK:
        _SESSIONS[key] = session
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
    return session


def what_if(base_dir: str | Path, finetune_dirs: Sequence[str | Path], method: str,
            model_params: Sequence[Mapping[str, Any] | None] | None = None,
            params: Mapping[str, Any] | None = None, *, seed: int = 0, **options) -> dict:
    """Merge ``finetune_dirs`` onto ``base_dir`` with ``method`` in memory and evaluate it on
    the zoo tasks; nothing is written. ``options``: WhatIfSession's (tasks, n_per_task, ...)."""
    get_method(method)  # unknown method: fail before loading anything
    return get_session(base_dir, finetune_dirs, **options).evaluate(method, model_params, params,
                                                                    seed=seed)


__all__ = ["WhatIfSession", "get_session", "what_if"]
