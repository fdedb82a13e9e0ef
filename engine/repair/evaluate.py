"""What a repair did, measured: refusal and own-task accuracy of the aligned model, the fine-tune
and the repaired model, and the trade-off over the method's knob (the Safety repair page and
its jobs read these; the bench measures the full grid with ``bench/repair_quality.py``).

Scores are the zoo's held-out sets (greedy decoding, exact match): ``refuse`` (harmful-marked
prompts; 1 - refusal is the attack success rate), the fine-tune's own zoo task, and the
aligned model's other zoo skills (``upper`` for the zoo's aligned model). Each repaired model
is written (atomically) to its own folder, then scored.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ParameterError
from engine.repair.registry import get_method

SAFETY_TASK = "refuse"
# The knob values a trade-off curve visits, per method (and Safe Delta's budget mode).
SWEEPS = {
    ("safe_delta", "paper"): [0.1, 10.0, 1000.0, 100000.0],
    ("safe_delta", "fraction"): [0.05, 0.2, 0.5, 0.8, 0.95],
    ("irr", None): [0.0, 0.25, 0.5, 0.75, 0.9],
    ("resta", None): [0.25, 0.5, 1.0, 2.0],
    ("random_mask", None): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("delta_scale", None): [0.25, 0.5, 0.75, 0.9],
}


def sweep_values(method: str, params: dict | None = None) -> tuple[str, list[float]]:
    """``(knob name, values)`` of the method's trade-off curve."""
    spec = get_method(method)
    mode = spec.parse_params(params).budget if method == "safe_delta" else None
    return spec.knob, list(SWEEPS[(method, mode)])


def score_tasks(aligned: str | Path, finetuned: str | Path) -> list[str]:
    """Refusal, the fine-tune's own zoo task, and the aligned model's other zoo tasks."""
    from engine.merge.calibration import zoo_task_of
    from engine.zoo import MANIFEST_NAME, load_manifest

    own = zoo_task_of(finetuned)
    if own is None or own == "all":
        raise ParameterError(f"{finetuned}: not a zoo fine-tune with a task of its own; score it "
                             "on your own data with python -m engine eval")
    tasks = [SAFETY_TASK, own]
    folder = Path(aligned).resolve()
    for root in list(folder.parents)[:3]:
        if (root / MANIFEST_NAME).is_file():
            for entry in load_manifest(root)["models"]:
                if Path(entry["abs_path"]) == folder:
                    tasks += [t for t in entry.get("also_trained_on") or [] if t not in tasks]
            break
    return tasks


def score(folder: str | Path, tasks: list[str], n: int) -> dict[str, float]:
    from engine.evaluate.loading import load_model_folder
    from engine.evaluate.scoring import Evaluator

    model, tokenizer = load_model_folder(folder)
    result = Evaluator(model, tokenizer, tasks, n, 0).evaluate()
    return {t: s["accuracy"] for t, s in result["tasks"].items()}


def repair_and_score(aligned, finetuned, out, method: str, params: dict | None = None, *,
                     unaligned=None, n: int = 64, progress=None) -> dict:
    """Repair into ``out`` (or reuse a finished ``out``) and score it with both inputs."""
    from engine.repair.run import repair

    tasks = score_tasks(aligned, finetuned)
    out = Path(out)
    if not (out / "delta_workbench_manifest.json").is_file():
        result = repair(aligned, finetuned, out, method, params, unaligned=unaligned,
                        progress=progress)
        summary, report, warnings = result.summary, result.report, result.warnings
    else:
        import json

        saved = json.loads((out / "delta_workbench_manifest.json").read_text())["repair"]
        report, warnings = saved["report"], saved["warnings"]
        summary = {"matrices": len(report), "kept_share": _kept(report, out)}
    return {"tasks": tasks, "summary": summary, "report": report, "warnings": warnings,
            "scores": {"aligned": score(aligned, tasks, n), "fine-tune": score(finetuned, tasks, n),
                       "repaired": score(out, tasks, n)}}


def _kept(report: dict, folder: Path) -> float | None:
    from engine.io import ModelFolder

    with ModelFolder(folder) as f:
        sizes = {name: f.info(name).numel for name in report}
    total = sum(sizes.values())
    kept = sum(sizes[n] * r["kept_share"] for n, r in report.items() if "kept_share" in r)
    return kept / total if total else None


def knob_curve(aligned, finetuned, workdir, method: str, params: dict | None = None, *,
               unaligned=None, n: int = 64, values: list[float] | None = None,
               progress=None) -> list[dict]:
    """One point per knob value: ``{knob, value, kept_share, scores}`` of the repaired model."""
    from engine.repair.run import repair

    knob, default_values = sweep_values(method, params)
    tasks = score_tasks(aligned, finetuned)
    points = []
    for i, value in enumerate(values or default_values):
        out = Path(workdir) / f"{knob}-{value:g}"
        if not (out / "delta_workbench_manifest.json").is_file():
            result = repair(aligned, finetuned, out, method, {**(params or {}), knob: value},
                            unaligned=unaligned)
            kept = result.summary["kept_share"]
        else:
            import json

            kept = _kept(json.loads((out / "delta_workbench_manifest.json").read_text())["repair"]["report"], out)
        points.append({"knob": knob, "value": value, "kept_share": kept, "scores": score(out, tasks, n)})
        if progress is not None:
            progress((i + 1) / len(values or default_values), f"{knob} = {value:g}")
    return points


__all__ = ["SWEEPS", "knob_curve", "repair_and_score", "score", "score_tasks", "sweep_values"]
