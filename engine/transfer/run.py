"""``transfer``: move a larger fine-tune's task knowledge into a smaller base (PostPKT, LaTen or
a control) and write the result as a full model of the target's shape.

Order of work (everything that can be refused is refused before any model is loaded):

1. method, task, parameters; the three folders opened by the strict reader; the source must
   be a fine-tune of the source base (same tensors); the target a base (a zoo fine-tune is
   refused), a Llama with the modules both methods read, no larger than the source in width,
   FFN width or depth (a cut needs the teacher to be the larger); both tokenizers must give
   the same ids (one family);
2. the data (``engine.transfer.data``): the task's train split, or ``--data``'s dev split;
3. the method (``engine.transfer.postpkt`` / ``engine.transfer.laten``); the target base, the
   transferred model and, with ``baselines``, the control and a plain full fine-tune of the
   same step budget scored on the task's held-out examples;
4. the output through the staged atomic writer: the weights (PostPKT's LoRA merged in), the
   target's config and tokenizer, a manifest (method, parameters, inputs' fingerprints,
   accuracies, learning curve, the paper's LoRA-vs-weights cosines) and a model card.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.errors import ConfigError, IncompatibleModelsError, ParameterError
from engine.transfer import METHODS

Progress = Callable[[float, str], None]
PAPER = ("Tan et al., Neural Incompatibility: The Unbridgeable Gap of Cross-Scale Parametric "
         "Knowledge Transfer in Large Language Models, ACL 2025")
SEEKING = "Zhong et al., Seeking Neural Nuggets, ICLR 2024"
NEEDED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_SEED = {"postpkt": 1, "postpkt_control": 1, "laten": 42, "laten_control": 42}


@dataclass
class TransferResult:
    out: Path
    method: str
    task: str
    params: dict
    accuracy: dict
    curve: list[dict]
    report: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)


def parse_params(method: str, params: dict | None):
    from pydantic import ValidationError

    from engine.transfer.laten import LaTenParams
    from engine.transfer.postpkt import PostPKTParams

    if method not in METHODS:
        raise ParameterError(f"unknown transfer method {method!r}; known: {', '.join(METHODS)}")
    cls = PostPKTParams if method.startswith("postpkt") else LaTenParams
    try:
        return cls(**(params or {}))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "params"
        raise ParameterError(f"{method} parameter {where}: {first.get('msg')}") from None


def _zoo_role(folder) -> str | None:
    from engine.textparse import parse_json

    file = Path(folder.path) / "delta_workbench_manifest.json"
    if not file.is_file() or file.stat().st_size > 1 << 24:
        return None
    data = parse_json(file.read_bytes(), source=str(file))
    zoo = data.get("zoo") if isinstance(data, dict) else None
    return zoo.get("role") if isinstance(zoo, dict) else None


def check_models(source, source_base, target) -> None:
    """The refusals of step 1 (see the module docstring), each naming the folder."""
    from engine.compat import require_compatible

    for folder, role in ((source, "source"), (source_base, "source base"), (target, "target")):
        if folder.config.get("model_type") != "llama":
            raise ConfigError(f"the {role} is not a Llama model (model_type "
                              f"{folder.config.get('model_type')!r}); transfer reads Llama modules",
                              path=folder.path)
        names = set(folder.tensor_names)
        for m in NEEDED:
            if f"model.layers.0.{m}.weight" not in names:
                raise ConfigError(f"the {role} has no {m} in its first layer", path=folder.path,
                                  tensor=f"model.layers.0.{m}.weight")
    try:
        require_compatible(source_base, [source])
    except IncompatibleModelsError as err:
        raise IncompatibleModelsError(f"the source is not a fine-tune of the source base: "
                                      f"{(err.reasons or [err.reason])[0]}", path=source.path) from None
    if _zoo_role(target) == "finetune":
        raise ConfigError("the target is a fine-tune (its zoo manifest says so); transfer goes "
                          "into a base", path=target.path)
    s, t = source.config, target.config
    for key, what in (("hidden_size", "width"), ("intermediate_size", "FFN width"),
                      ("num_hidden_layers", "depth")):
        if int(t[key]) > int(s[key]):
            raise IncompatibleModelsError(f"the target's {what} ({t[key]}) is larger than the "
                                          f"source's ({s[key]}): the teacher must be the larger",
                                          path=target.path)
    if s.get("vocab_size") != t.get("vocab_size"):
        raise IncompatibleModelsError(f"vocabularies differ ({s.get('vocab_size')} vs "
                                      f"{t.get('vocab_size')}): one tokenizer is needed", path=target.path)


def check_tokenizers(tok_s, tok_t, examples, target_path) -> None:
    for prompt, answer in examples[:16]:
        if list(tok_s(prompt + answer)["input_ids"]) != list(tok_t(prompt + answer)["input_ids"]):
            raise IncompatibleModelsError("the source and target tokenizers give different ids; "
                                          "both methods need one tokenizer", path=target_path)


def _accuracy(model, tokenizer, task: str, n_eval: int, state=None) -> float:
    from engine.evaluate.scoring import Evaluator

    ev = Evaluator(model, tokenizer, tasks=[task], n_per_task=n_eval, n_generic=0)
    if state is not None:
        return ev.evaluate_state_dict(state)["tasks"][task]["accuracy"]
    return ev.evaluate()["tasks"][task]["accuracy"]


def transfer(source, source_base, target, out, method: str, task: str, params: dict | None = None,
             *, data=None, seed: int | None = None, device=None, n_eval: int = 128,
             baselines: bool = False, progress: Progress | None = None) -> TransferResult:
    """Write the transferred model to ``out`` (see the module docstring)."""
    from engine.device import resolve_device
    from engine.evaluate.calibration_data import CalibrationData
    from engine.evaluate.tasks import MAIN_TASKS
    from engine.io import ModelFolder
    from engine.io.staging import check_destination

    started = time.perf_counter()
    opts = parse_params(method, params)
    if task not in MAIN_TASKS:
        raise ParameterError(f"unknown task {task!r}; known: {', '.join(MAIN_TASKS)}")
    if n_eval < 1:
        raise ParameterError("n_eval must be >= 1")
    seed = DEFAULT_SEED[method] if seed is None else int(seed)
    compute = resolve_device(device)
    say = progress or (lambda f, m: None)
    file = CalibrationData.read(data, named_by="--data") if data is not None else None
    with ModelFolder(source) as fs, ModelFolder(source_base) as fb, ModelFolder(target) as ft:
        check_destination(Path(out).absolute(), [fs.path, fb.path, ft.path])
        check_models(fs, fb, ft)
        paths = (fs.path, fb.path, ft.path)
        prints = {"source": fs.file_fingerprints(), "source_base": fb.file_fingerprints(),
                  "target": ft.file_fingerprints()}
        target_config = dict(ft.config)
        dtypes = {n: ft.info(n).dtype for n in ft.tensor_names}
    from engine.evaluate.loading import load_model_folder
    from engine.transfer.data import ExamplePool

    say(0.02, "loading models")
    teacher, tok_s = load_model_folder(paths[0])
    student, tok = load_model_folder(paths[2])
    pool = ExamplePool(task, seed, file)
    check_tokenizers(tok_s, tok, pool.take(16, "the tokenizer check"), paths[2])
    teacher.to(compute).eval()
    student.to(compute).eval()
    fresh = copy.deepcopy(student)  # the untouched target, for the baselines and the scores
    accuracy = {"target_base": _accuracy(fresh, tok, task, n_eval)}
    say(0.05, f"target base {accuracy['target_base']:.3f}")
    run = _run_postpkt if method.startswith("postpkt") else _run_laten
    state, report, curve = run(method, teacher, student, tok, pool, opts, seed, paths, task,
                               n_eval, compute, lambda f, m: say(0.05 + 0.8 * f, m))
    accuracy["transferred"] = _accuracy(copy.deepcopy(fresh), tok, task, n_eval, state)
    if baselines:
        accuracy.update(_baselines(method, teacher, fresh, tok, opts, seed, paths, task, n_eval,
                                   compute, data=file, say=lambda f, m: say(0.85 + 0.1 * f, m)))
    warnings = list(pool.warnings)
    card_params = opts.model_dump(mode="json")
    manifest = {"kind": "transfer", "transfer": {
        "method": method, "paper": PAPER, **({"postpkt_after": SEEKING} if "postpkt" in method else {}),
        "task": task, "seed": seed, "params": card_params,
        "source": str(paths[0]), "source_base": str(paths[1]), "target": str(paths[2]),
        "data": str(file.path) if file is not None else f"zoo task {task} (train split)",
        "fingerprints": prints, "accuracy": accuracy, "curve": curve, "report": report,
        "warnings": warnings}}
    _write(out, state, target_config, dtypes, paths, method, card_params, task, accuracy, manifest)
    say(1.0, "written")
    return TransferResult(Path(out), method, task, card_params, accuracy, curve, report,
                          time.perf_counter() - started, warnings)


def _write(out, state, config, dtypes, paths, method, card_params, task, accuracy, manifest) -> None:
    from engine.export_card import CARD_NAME, model_card
    from engine.io import ModelWriter
    from engine.io.side_files import TOKENIZER_FILES, read_side_files
    from engine.errors import NonFiniteError

    card = model_card(base=paths[2], inputs=[paths[0], paths[1]], method=method,
                      parameters=card_params, tags=["transfer", "cross-scale"],
                      evaluation={task: accuracy["transferred"]},
                      body=f"The target base with the task knowledge of {paths[0].name} transferred "
                           f"by {method} ({PAPER}).")
    extra = {**read_side_files(paths[2], (*TOKENIZER_FILES, "generation_config.json")),
             CARD_NAME: card.encode()}
    plan = [(n, dtypes[n], tuple(state[n].shape)) for n in dtypes]
    missing = [n for n in dtypes if n not in state]
    if missing:
        raise ConfigError("the transferred state lacks a target tensor", tensor=missing[0])
    with ModelWriter(out, config=config, extra_files=extra, manifest_extra=manifest,
                     input_folders=list(paths), plan=plan) as writer:
        for name in dtypes:
            tensor = state[name].detach().to(dtypes[name]).cpu()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError("NaN/Inf in the transferred weights; transfer refused",
                                     tensor=name)
            writer.add_tensor(name, tensor)


def _run_postpkt(method, teacher, student, tok, pool, opts, seed, paths, task, n_eval, compute, say):
    from engine.evaluate.loading import load_model_folder
    from engine.transfer.data import encode
    from engine.transfer.lora import merged_state
    from engine.transfer.paper_measure import lora_cosines
    from engine.transfer.postpkt import finetune, prepare_student, select_layers, sensitivity

    control = method.endswith("_control")
    seeds = [encode(tok, ex) for ex in pool.take(opts.n_seed, "the seed samples")]
    train_set = [encode(tok, ex) for ex in pool.take(opts.n_train, "the fine-tune set")]
    scores, kept, base_state = None, None, None
    if not control and opts.extract_from != "student":
        scores = sensitivity(teacher, seeds, tok.pad_token_id, lambda m: say(0.1, m))
        kept = select_layers(scores, teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        if opts.extract_from == "task_vector":
            base_model, _ = load_model_folder(paths[1])
            base_state = {k: v.float().to(compute) for k, v in base_model.state_dict().items()}
    teacher_state = {k: v.detach().float() for k, v in teacher.state_dict().items()}
    original = {k: v.detach().float().cpu().clone() for k, v in student.state_dict().items()}
    trainable, report = prepare_student(student, teacher_state, scores, kept, opts, control, seed,
                                        base_state)
    init = report.pop("initial_factors")
    report["lora_cosines"] = lora_cosines(original, init, opts.alpha / opts.rank)
    from engine.evaluate.scoring import Evaluator

    ev = Evaluator(student, tok, tasks=[task], n_per_task=n_eval, n_generic=0)
    curve: list[dict] = []
    finetune(student, trainable, train_set, tok.pad_token_id, opts, seed,
             on_eval=lambda step: curve.append({"step": step, "accuracy":
                                                ev.evaluate()["tasks"][task]["accuracy"]}),
             say=lambda m: say(0.5, m))
    report["steps"] = len(curve) and curve[-1]["step"]
    return merged_state(student), report, curve


def _run_laten(method, teacher, student, tok, pool, opts, seed, paths, task, n_eval, compute, say):
    from engine.transfer.data import encode
    from engine.transfer.laten import inject, train

    control = method.endswith("_control")
    extract = pool.take(opts.n_extract, "the extract set")
    align = [encode(tok, ex) for ex in pool.take(opts.n_align, "the align set")]
    translators, losses, report = train(teacher, student, tok, extract, align,
                                        [encode(tok, ex) for ex in extract], opts, seed,
                                        control=control, say=lambda m: say(0.5, m))
    seed_example = pool.take(1, "the inference seed example")[0]
    state, where = inject(teacher, student, tok, translators, seed_example, opts, control=control, seed=seed)
    report.update(where)
    report["losses"] = losses
    return state, report, []


def _baselines(method, teacher, fresh, tok, opts, seed, paths, task, n_eval, compute, *, data, say) -> dict:
    """The control method's accuracy (same pool seed) and a plain full fine-tune of the target
    with the same step budget, learning rate and batch size as the method's training."""
    from engine.transfer.data import ExamplePool, encode
    from engine.transfer.postpkt import PostPKTParams, finetune

    out = {}
    control = method if method.endswith("_control") else f"{method}_control"
    if control != method:
        student = copy.deepcopy(fresh)
        run = _run_postpkt if method.startswith("postpkt") else _run_laten
        state, _, _ = run(control, teacher, student, tok, ExamplePool(task, seed, data), opts, seed,
                          paths, task, n_eval, compute, say)
        out["control"] = _accuracy(copy.deepcopy(fresh), tok, task, n_eval, state)
    if method.startswith("postpkt"):
        spec = opts.model_copy(update={"curve_steps": []})
    else:  # LaTen's budget: n_extract steps of (align_per_step + 1) examples
        per = opts.align_per_step + 1
        spec = PostPKTParams(n_train=opts.n_extract * per, epochs=1, batch_size=per, micro_batch=per,
                             lr=opts.lr, warmup_ratio=0.1, dropout=0.0, curve_steps=[])
    pool = ExamplePool(task, seed, data)
    train_set = [encode(tok, ex) for ex in pool.take(spec.n_train, "the plain fine-tune set")]
    plain = copy.deepcopy(fresh)
    for p in plain.parameters():
        p.requires_grad_(True)
    finetune(plain, list(plain.parameters()), train_set, tok.pad_token_id, spec, seed,
             say=lambda m: say(0.5, "plain " + m))
    out["plain_finetune"] = _accuracy(plain, tok, task, n_eval)
    return out
