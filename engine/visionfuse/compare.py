"""In-memory comparison for the Vision fusion page and the bench: each member alone, the
members' token streams concatenated over one member's *unmerged* LM (concatenation without the
merge), and the fused model (merged LM + every stream), per vision task; plain numbers and
lists only (the page knows nothing of tensors)."""

from __future__ import annotations

from pathlib import Path


def _lm_with(config: dict, state: dict):
    from engine.evaluate.loading import model_from_config
    from engine.evaluate.scoring import _load_strict

    lm = model_from_config(config)
    _load_strict(lm, state)
    return lm.eval()


def compare(base: str | Path, models: list[str | Path], method: str = "task_arithmetic",
            params: dict | None = None, weights: list[float] | None = None,
            n_per_task: int = 64, samples: int = 4) -> dict:
    """``{"rows": [{"label", "kind", "tasks": {task: {accuracy, char_accuracy}}}],
    "samples": [{"image": 12x24 list, "string", "answers": {label: {task: prediction}}}]}``."""
    from engine.evaluate.vision_scoring import score_vision
    from engine.evaluate.vision_tasks import VISION_TASK_NAMES, heldout_images
    from engine.visionfuse.fuse import merge_language_models, open_inputs
    from engine.visionfuse.weights import default_weights
    from engine.zoo.mllm import streams_of

    config, base_state, members = open_inputs(base, models)
    if weights is None:
        weights = default_weights(method, len(members))
    merged = merge_language_models(base_state, members, method, params, weights)
    streams = [s for m in members for s in streams_of(m.model, m.view)]
    runs = [(f"{m.path.name} alone", "member", m.model, streams_of(m.model, m.view))
            for m in members]
    runs.append((f"concatenation, {members[0].path.name}'s LM unmerged", "concat",
                 _lm_with(config, members[0].lm_state), streams))
    runs.append((f"fused ({method})", "fused", _lm_with(config, merged), streams))
    rows, answers = [], {}
    for label, kind, lm, st in runs:
        scores = score_vision(lm, st, None, n_per_task, with_predictions=samples)["tasks"]
        rows.append({"label": label, "kind": kind, "tasks": {
            t: {"accuracy": s["accuracy"], "char_accuracy": s["char_accuracy"]}
            for t, s in scores.items()}})
        answers[label] = {t: [x["prediction"] for x in s.get("samples", [])]
                          for t, s in scores.items()}
    shown = heldout_images(samples, VISION_TASK_NAMES[0])
    out_samples = []
    for i, (image, string) in enumerate(shown):
        out_samples.append({"image": [[round(float(v), 3) for v in row] for row in image],
                            "string": string,
                            "answers": {label: answers[label][VISION_TASK_NAMES[0]][i]
                                        for label in answers}})
    return {"rows": rows, "samples": out_samples, "weights": list(weights), "method": method,
            "n": n_per_task}
