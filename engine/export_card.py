"""Model cards: the README.md every export writes (merge, rebuild, extract-lora).

YAML front matter as the Hugging Face hub reads it (``base_model``, ``library_name``, ``tags``,
and the recipe or parameters under ``delta_workbench``), then a short body: inputs, method and
parameters, and the evaluation table when one was run. Text only; the JSON manifest beside it
stays the machine-readable record.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _name(path) -> str:
    return Path(str(path)).name or str(path)


def model_card(*, base: str | Path | None, inputs: list[str | Path], method: str,
               parameters: dict | None = None, recipe: str | None = None,
               library: str = "transformers", body: str = "",
               evaluation: dict | None = None) -> str:
    """The README.md text. ``evaluation``: ``{task: accuracy}`` or ``{model: {task: value}}``."""
    front = {
        "base_model": str(base) if base is not None else None,
        "library_name": library,
        "tags": ["merge", "delta-workbench", method],
        "delta_workbench": {"method": method, "inputs": [str(p) for p in inputs],
                            **({"parameters": parameters} if parameters else {}),
                            **({"recipe": recipe} if recipe else {})},
    }
    if front["base_model"] is None:
        front.pop("base_model")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {method} of {', '.join(_name(p) for p in inputs)}", ""]
    if body:
        lines += [body, ""]
    lines += ["## Inputs", ""]
    if base is not None:
        lines.append(f"- base: `{_name(base)}`")
    lines += [f"- `{_name(p)}`" for p in inputs]
    lines += ["", "## Method", "", f"`{method}`"]
    if parameters:
        lines += ["", "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in parameters.items()]
    if recipe:
        lines += ["", "Recipe:", "", "```yaml", recipe.rstrip(), "```"]
    if evaluation:
        lines += ["", "## Evaluation", ""]
        rows = evaluation if all(isinstance(v, dict) for v in evaluation.values()) else {"": evaluation}
        tasks = sorted({t for scores in rows.values() for t in scores})
        lines += ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for model, scores in rows.items():
            cells = [f"{scores[t]:.3f}" if isinstance(scores.get(t), (int, float)) else "" for t in tasks]
            lines.append(f"| {model or 'this model'} | " + " | ".join(cells) + " |")
    lines += ["", "Written by Delta Workbench.", ""]
    return "\n".join(lines)
