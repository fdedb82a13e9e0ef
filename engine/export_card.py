"""Model cards: the README.md every export writes (merge, rebuild, extract-lora).

YAML front matter as the Hugging Face hub reads it (``base_model``, ``library_name``, ``tags``,
and the recipe or parameters under ``delta_workbench``), then a short body: inputs, method and
parameters, and the evaluation table when one was run. Text only; the JSON manifest beside it
stays the machine-readable record. Folder names and parameter values come from the user's
files: the body shows them through ``printable`` (no control characters), and the front matter
is written by ``yaml.safe_dump``, so no input can end it early or add keys to it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.text import printable

CARD_NAME = "README.md"


class _CardDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the recipe) as literal blocks, readable in the card;
    PyYAML falls back to a quoted scalar when a string cannot be a block."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_CardDumper.add_representer(str, _str)


def _name(path) -> str:
    return printable(Path(str(path)).name or str(path))


def _cell(value) -> str:
    return printable(value).replace("|", "\\|").replace("`", "'")


def evaluation_table(result: dict) -> dict[str, float]:
    """``{task: accuracy, ..., "perplexity": value}`` of an evaluation result
    (``{"tasks": {name: {"accuracy", "n"}}, "perplexity": float | {name: float}}``)."""
    table = {task: float(score["accuracy"]) for task, score in (result.get("tasks") or {}).items()}
    perplexity = result.get("perplexity")
    if isinstance(perplexity, (int, float)):
        table["perplexity"] = float(perplexity)
    elif isinstance(perplexity, dict):
        table.update({f"perplexity {name}": float(v) for name, v in perplexity.items()})
    return table


def model_card(*, base: str | Path | None, inputs: list[str | Path], method: str,
               parameters: dict | None = None, recipe: str | None = None,
               library: str = "transformers", body: str = "",
               evaluation: dict | None = None, tags: list[str] | None = None) -> str:
    """The README.md text. ``evaluation``: ``{task: accuracy}`` or ``{model: {task: value}}``;
    ``tags`` are added after ``merge, delta-workbench, <method>``."""
    front = {
        "base_model": str(base) if base is not None else None,
        "library_name": library,
        "tags": list(dict.fromkeys(["merge", "delta-workbench", method, *(tags or [])])),
        "delta_workbench": {"method": method, "inputs": [str(p) for p in inputs],
                            **({"parameters": parameters} if parameters else {}),
                            **({"recipe": recipe} if recipe else {})},
    }
    if front["base_model"] is None:
        front.pop("base_model")
    # not stripped: a block scalar's last line break is part of its value
    dumped = yaml.dump(front, Dumper=_CardDumper, sort_keys=False, allow_unicode=False)
    lines = ["---", dumped + "---", "",
             f"# {printable(method)} of {', '.join(_name(p) for p in inputs)}", ""]
    if body:
        lines += [body, ""]
    lines += ["## Inputs", ""]
    if base is not None:
        lines.append(f"- base: `{_cell(_name(base))}`")
    lines += [f"- `{_cell(_name(p))}`" for p in inputs]
    lines += ["", "## Method", "", f"`{_cell(method)}`"]
    if parameters:
        lines += ["", "| parameter | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | `{_cell(v)}` |" for k, v in parameters.items()]
    if recipe:
        lines += ["", "Recipe:", "", "```yaml",
                  *(printable(line).replace("```", "'''") for line in recipe.rstrip().splitlines()),
                  "```"]
    if evaluation:
        lines += ["", "## Evaluation", ""]
        rows = evaluation if all(isinstance(v, dict) for v in evaluation.values()) else {"": evaluation}
        tasks = list(dict.fromkeys(t for scores in rows.values() for t in scores))
        lines += ["| model | " + " | ".join(_cell(t) for t in tasks) + " |",
                  "|---" * (len(tasks) + 1) + "|"]
        for model, scores in rows.items():
            cells = [f"{scores[t]:.3f}" if isinstance(scores.get(t), (int, float)) else "" for t in tasks]
            lines.append(f"| {_cell(model) or 'this model'} | " + " | ".join(cells) + " |")
    lines += ["", "Written by Delta Workbench.", ""]
    return "\n".join(lines)


def merge_card(recipe, *, base: str | Path | None, inputs: list[str | Path],
               evaluation: dict | None = None) -> str:
    """The card of a merge: the recipe (as ``merge_recipe.yml`` holds it) and its global
    parameters; ``evaluation`` an evaluation result of the merged model."""
    parameters = {k: v for scope in recipe.parameter_scopes() for k, v in scope.items()}
    return model_card(base=base, inputs=inputs, method=recipe.merge_method, parameters=parameters,
                      recipe=recipe.to_yaml(),
                      evaluation=evaluation_table(evaluation) if evaluation else None)


def rebuild_card(*, method: str, params: dict, base: str | Path, artifact: str | Path,
                 target_ratio=None, artifact_bytes: int | None = None) -> str:
    """The card of a fine-tune rebuilt from a compressed artifact and its base."""
    size = [f"{artifact_bytes} bytes"] if artifact_bytes is not None else []
    if isinstance(target_ratio, (int, float)) and not isinstance(target_ratio, bool) and target_ratio > 0:
        size.append(f"target ratio {target_ratio:g}x")
    size_text = f" ({', '.join(size)})" if size else ""
    return model_card(base=base, inputs=[artifact], method=method, parameters=params or None,
                      tags=["compressed-delta"],
                      body=f"A fine-tune rebuilt from the `{_cell(method)}` artifact "
                           f"`{_cell(_name(artifact))}`{size_text} and its base: base + the decoded delta.")


def extract_lora_card(*, base: str | Path, finetuned: str | Path, options: dict) -> str:
    """The card of a LoRA adapter extracted from a fine-tune."""
    return model_card(base=base, inputs=[finetuned], method="extract-lora", parameters=options,
                      library="peft", tags=["lora"],
                      body=f"A LoRA adapter of rank <= {options.get('rank')} extracted from the "
                           "fine-tune by truncated SVD of each linear layer's task vector.")
