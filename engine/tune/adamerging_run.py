"""``tune --sampler adamerging``: learn AdaMerging coefficients for a recipe's models on the
unlabeled dev prompts of their zoo tasks, write the plain recipe, score it on the dev split."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ParameterError
from engine.text import printable


def dev_prompts(task: str, n: int) -> list[str]:
    """Unlabeled prompts of a zoo task's dev examples (after the held-out report's)."""
    from engine.evaluate.scoring import DEFAULT_N_PER_TASK
    from engine.evaluate.tasks import TASKS, heldout_examples

    examples = heldout_examples(TASKS[task], DEFAULT_N_PER_TASK + n)[DEFAULT_N_PER_TASK:]
    return [prompt for prompt, _ in examples]


def run_adamerging(recipe_path, *, granularity: str = "task", steps: int = 500,
                   n_prompts: int = 64, n_per_task: int = 64, seed: int = 0, device=None,
                   lr: float = 1e-3) -> dict:
    from engine.evaluate.tasks import TASKS
    from engine.merge.calibration import zoo_task_of
    from engine.tune.adamerging import adamerging, coefficient_recipe
    from engine.tune.objective import TrialScorer, settings_for_recipe
    from engine.tune.run import read_tune_recipe

    # ranges are allowed (their midpoints stand in; the learned weights replace them)
    _, midpoint = read_tune_recipe(recipe_path, require_ranges=False)
    settings = settings_for_recipe(midpoint, recipe_dir=Path(recipe_path).parent,
                                   n_per_task=n_per_task, device=device)
    tasks = [zoo_task_of(f) for f in settings.finetune_dirs]
    if not all(tasks):
        raise ParameterError("adamerging needs each fine-tune's zoo task (its unlabeled prompts)")
    scorer = TrialScorer(settings)
    session = scorer.session
    result = adamerging(session.base, session.finetunes, session.model, session.tokenizer,
                        [dev_prompts(t, n_prompts) for t in tasks],
                        max_new_tokens=[TASKS[t].max_answer_chars for t in tasks],
                        granularity=granularity, steps=steps, lr=lr, seed=seed)
    plain = coefficient_recipe(midpoint.model_dump(exclude_none=True), result)
    scored = scorer.score(plain)
    return {"recipe": plain, "result": result, "score": scored}


def run_adamerging_cmd(args) -> int:
    from engine.tune.run import plain_yaml, write_text_atomic

    out = run_adamerging(args.recipe, granularity=args.granularity,
                         steps=500 if args.steps is None else args.steps,
                         n_per_task=args.n_per_task, seed=args.seed, device=args.device)
    write_text_atomic(Path(args.out), plain_yaml(out["recipe"]))
    entropy = out["result"].entropy
    summary = {"best_score": out["score"]["score"], "best_tasks": out["score"]["tasks"],
               "entropy_first": entropy[0] if entropy else None,
               "entropy_last": entropy[-1] if entropy else None, "steps": len(entropy),
               "outputs": [args.out]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"adamerging ({args.granularity}-wise, {len(entropy)} steps): dev score "
              f"{summary['best_score']:.4f}; wrote {printable(str(args.out))}")
    return 0
