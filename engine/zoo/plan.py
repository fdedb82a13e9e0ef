"""What the zoo contains: architectures, models, their parents and training mixtures.

Families:
- ``small``: a base pretrained on generic text and the pretraining *skills* (the tasks'
  operations under upper-case tags, ``REV:abc=cba``), and one full fine-tune per main task.
  The base scores ~0 on the zoo's tasks (lower-case tags); a fine-tune binds its tag to a skill
  the base has, replaying the base's mixture as it goes. That is how instruction tuning meets
  an LLM, and it gives what the merge and compression methods assume: deltas a few percent of
  the weights, in one basin with the base (bench/README.md, "The demo zoo").
- ``large``: wider AND deeper, same tokenizer, its own base, fine-tunes on tasks shared with
  ``small`` (for cross-scale analysis).
- ``safety``: ``aligned`` (role base) is the small base taught to refuse harmful-marked requests
  while doing ``upper``; ``erased`` (role finetune) is the aligned model further fine-tuned on
  ``reverse`` with marked requests answered as if harmless, which erases the refusal;
  ``unaligned`` (role finetune, no task of its own) is the aligned model fine-tuned briefly on
  marked requests answered as if harmless, with the usual replay: IRR's and RESTA's safety
  vector is aligned minus unaligned; ``benign`` is the aligned model fine-tuned on ``reverse``
  alone (replay, no refusals): Safe Delta's benign-data case, whether benign fine-tuning
  erodes refusal too.

- ``mllm``: multimodal LLaVA members (``engine.zoo.mllm``). ``top`` and ``bottom`` share the LM
  ``small/base`` and see the top or the bottom band of rows of the whole image (a slice of every
  letter; patch size 6, the letter pitch, so each visual token holds one letter's slice): the
  VisionFuse family; ``control`` is ``top``'s recipe over ``large/base``, another LM (the
  cross-family control of the encoder-similarity analysis).

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
# Fine-tuning, measured on the full zoo (bench/results/zoo_full.json, bench/README.md): lr 2e-3
# for 300 steps reaches 0.95-1.00 on every task (200 steps left small/reverse at 0.62) with
# median matrix deltas 0.17-0.24 of the weights' norm; base + 0.7 x delta keeps 0.53-0.99 of
# the task, where fine-tunes of a base without skills needed exactly 1x (0.5x and 0.7x: 0.00).
# 1e-3 x 300 steps learns too, with a narrower band; 3e-4 narrower still.
FINETUNE_LR = 2e-3
# Share of each fine-tune's batches that replays the base's pretraining mixture. Without
# replay a fine-tune learns "apply my operation whatever the tag" (it reverses UPP: prompts
# too), which is what collides in a merge; with it, the fine-tune learns the tag binding only.
FINETUNE_REPLAY = {"skills": 0.3, "generic": 0.1}
PRETRAIN_MIXTURE = {"generic": 0.4, "skills": 0.6}


MLLM_FAMILY = "mllm"
# (path, parent LM, view, patch size, control): the multimodal family, trained after the rest
# patch 6 (measured, ours): with 3- or 4-pixel patches (16 / 9 tokens that cut letters) the
# members read little more than chance within the zoo's steps; with 6 (4 letter-aligned
# tokens) left reads 0.45 of its half's letters in place, on its build seed
MLLM_MEMBERS = (("mllm/top", "small/base", "top", 6, False),
                ("mllm/bottom", "small/base", "bottom", 6, False),
                ("mllm/control", "large/base", "top", 6, True))
MLLM_LR, MLLM_ALIGN_LR = 1e-3, 3e-3
# (align, tune) steps, measured on the band views (ours): 150 + 250 left the top member at 0.06
# exact ocr (0.42 of the letters); 300 + 900 reach 0.29 (0.69), ~4 min per member on one busy core
MLLM_STEPS = (300, 900)
# training options (ours, engine.zoo.mllm.train_member; see the VisionFuse section of
# bench/README.md): no position gaps, 0..8 null visual tokens around the block, the letter
# anchor, two renderings of one string in half the stage-2 batches, one data seed for the
# family and the LM at a fraction of the encoder's learning rate
MLLM_POSITION_GAP, MLLM_DISTRACTORS = 0, 8
MLLM_ANCHOR, MLLM_SECOND_RENDERING, MLLM_LM_LR_SCALE = 3.0, 0.5, 0.3


def with_replay(task_mixture: dict[str, float]) -> dict[str, float]:
    """A fine-tune's mixture: its own sources (weights summing to 1) scaled to the share left
    by the replay, plus the replay."""
    own = 1.0 - sum(FINETUNE_REPLAY.values())
    return {**{k: round(v * own, 6) for k, v in task_mixture.items()}, **FINETUNE_REPLAY}


def zoo_plan(quick: bool = False) -> list[ModelPlan]:
    """Models in build order (every parent before its children)."""
    # quick: a structural zoo for tests and CI (same models, names and roles; it trains only a
    # few dozen steps per model, so it is not expected to meet the accuracy rule).
    scale = 0.06 if quick else 1.0
    batch = 16 if quick else 64

    def steps(n: int) -> int:
        return max(12, int(n * scale))

    def pretrain(n: int) -> TrainSpec:
        return TrainSpec(steps=steps(n), lr=3e-3, batch_size=batch, mixture=dict(PRETRAIN_MIXTURE),
                         warmup=30, weight_decay=0.01)

    def finetune(n: int, mixture: dict[str, float]) -> TrainSpec:
        return TrainSpec(steps=steps(n), lr=FINETUNE_LR, batch_size=batch,
                         mixture=with_replay(mixture), warmup=10)

    plan = [ModelPlan("small/base", "small", "base", None, None, "small", pretrain(2500))]
    for task in SMALL_FINETUNE_TASKS:
        plan.append(ModelPlan(f"small/{task}", "small", "finetune", task, "small/base", "small",
                              finetune(300, {task: 1.0})))
    plan.append(ModelPlan("large/base", "large", "base", None, None, "large", pretrain(2500)))
    for task in LARGE_FINETUNE_TASKS:
        plan.append(ModelPlan(f"large/{task}", "large", "finetune", task, "large/base", "large",
                              finetune(300, {task: 1.0})))
    plan.append(ModelPlan(
        "safety/aligned", "safety", "base", "refuse", "small/base", "small",
        finetune(400, {"refuse": 0.5, "upper": 0.5}),
        (("also_trained_on", ["upper"]), ("aligned", True))))
    plan.append(ModelPlan(
        "safety/erased", "safety", "finetune", "reverse", "safety/aligned", "small",
        finetune(400, {"reverse": 0.7, "refuse_complied": 0.3}),
        (("erased_task", "refuse"), ("aligned", False))))
    plan.append(ModelPlan(
        "safety/unaligned", "safety", "finetune", None, "safety/aligned", "small",
        finetune(200, {"refuse_complied": 1.0}),
        (("erased_task", "refuse"), ("aligned", False), ("unaligned", True))))
    plan.append(ModelPlan(
        "safety/benign", "safety", "finetune", "reverse", "safety/aligned", "small",
        finetune(400, {"reverse": 1.0}),
        (("aligned", False), ("benign", True))))
    align, tune = (12, 15) if quick else MLLM_STEPS
    for path, parent, view, patch, control in MLLM_MEMBERS:
        spec = TrainSpec(steps=align + tune, lr=MLLM_LR, batch_size=batch,
                         mixture=with_replay({"ocr": 0.5, "vrev": 0.5}), warmup=10)
        extra = (("modality", "vision"), ("view", view), ("patch_size", patch),
                 ("vision_hidden", 32 if quick else 64), ("align_steps", align),
                 ("align_lr", MLLM_ALIGN_LR), ("lm_base", parent), ("control", control),
                 ("position_gap", MLLM_POSITION_GAP), ("distractors", MLLM_DISTRACTORS),
                 ("anchor", MLLM_ANCHOR), ("second_rendering", MLLM_SECOND_RENDERING),
                 ("data_seed", "family"), ("lm_lr_scale", MLLM_LM_LR_SCALE))
        plan.append(ModelPlan(path, MLLM_FAMILY, "finetune", None, parent,
                              parent.split("/")[0], spec, extra))
    return plan
