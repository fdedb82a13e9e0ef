"""What the zoo contains: architectures, models, their parents and training mixtures.

Families:
- ``small``: a base pretrained on generic text, and one full fine-tune per main task.
- ``large``: wider AND deeper, same tokenizer, its own base, fine-tunes on tasks shared with
  ``small`` (for cross-scale analysis).
- ``safety``: ``aligned`` (role base) is the small base taught to refuse harmful-marked requests
  while doing ``upper``; ``erased`` (role finetune) is the aligned model further fine-tuned on
  ``reverse`` with marked requests answered as if harmless, which erases the refusal.

``quick`` keeps the same models, names and roles with smaller widths and fewer steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.zoo.train import TrainSpec


@dataclass(frozen=True)
class Arch:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelPlan:
    path: str  # relative folder inside the zoo
    family: str
    role: str  # "base" | "finetune"
    task: str | None
    parent: str | None  # path of the model it is trained from; None: fresh initialisation
    arch: str
    spec: TrainSpec
    extra: tuple = ()  # extra manifest fields as (key, value) pairs


FULL_ARCHS = {"small": Arch(128, 2, 4, 256), "large": Arch(160, 3, 5, 320)}
QUICK_ARCHS = {"small": Arch(48, 2, 4, 96), "large": Arch(64, 3, 4, 128)}

# "lookup" (key->value recall) is not fine-tuned: a 2-3 layer model of this size does not learn
# it within the build budget (measured: ~0.3 after 1,500 steps), so it stays an evaluation-only
# control task that no zoo model solves.
SMALL_FINETUNE_TASKS = ["reverse", "upper", "shift", "sort", "increment"]
LARGE_FINETUNE_TASKS = ["reverse", "upper"]
# Measured on the full archs (exact match on 100 held-out prompts, from a 1,000-1,500-step
# base): at 2e-3 every fine-tuned task passes 0.9 within ~1,000 steps; 3e-3 learns faster but
# oscillates on ``shift``; 1e-3 stays below 0.3 on reverse/upper after 600 steps.
FINETUNE_LR = 2e-3


def zoo_plan(quick: bool = False) -> list[ModelPlan]:
    """Models in build order (every parent before its children)."""
    # quick: a structural zoo for tests and CI (same models, names and roles; it trains only a
    # few dozen steps per model, so it is not expected to meet the accuracy rule).
    scale = 0.06 if quick else 1.0
    batch = 16 if quick else 64

    def steps(n: int) -> int:
        return max(12, int(n * scale))

    def pretrain(n: int) -> TrainSpec:
        return TrainSpec(steps=steps(n), lr=3e-3, batch_size=batch, mixture={"generic": 1.0},
                         warmup=30, weight_decay=0.01)

    def finetune(n: int, mixture: dict[str, float]) -> TrainSpec:
        lr = FINETUNE_LR
        return TrainSpec(steps=steps(n), lr=lr, batch_size=batch, mixture=mixture, warmup=10)

    plan = [ModelPlan("small/base", "small", "base", None, None, "small", pretrain(1000))]
    for task in SMALL_FINETUNE_TASKS:
        plan.append(ModelPlan(f"small/{task}", "small", "finetune", task, "small/base", "small",
                              finetune(1200, {task: 1.0})))
    plan.append(ModelPlan("large/base", "large", "base", None, None, "large", pretrain(800)))
    for task in LARGE_FINETUNE_TASKS:
        plan.append(ModelPlan(f"large/{task}", "large", "finetune", task, "large/base", "large",
                              finetune(800, {task: 1.0})))
    plan.append(ModelPlan(
        "safety/aligned", "safety", "base", "refuse", "small/base", "small",
        finetune(800, {"refuse": 0.5, "upper": 0.5}),
        (("also_trained_on", ["upper"]), ("aligned", True))))
    plan.append(ModelPlan(
        "safety/erased", "safety", "finetune", "reverse", "safety/aligned", "small",
        finetune(1000, {"reverse": 0.7, "refuse_complied": 0.3}),
        (("erased_task", "refuse"), ("aligned", False))))
    return plan
