from engine.zoo.build import _families
from engine.zoo.plan import MLLM_FAMILY, zoo_plan

TEXT_PATHS = ["small/base", "small/reverse", "small/upper", "small/shift", "small/sort",
              "small/increment", "large/base", "large/reverse", "large/upper", "safety/aligned",
              "safety/erased", "safety/unaligned", "safety/benign"]


def test_mllm_family_is_added_after_the_text_families():
    for quick in (True, False):
        plan = zoo_plan(quick)
        assert [p.path for p in plan[:len(TEXT_PATHS)]] == TEXT_PATHS
        mllm = [p for p in plan if p.family == MLLM_FAMILY]
        assert [p.path for p in mllm] == ["mllm/top", "mllm/bottom", "mllm/control"]
        assert [p.parent for p in mllm] == ["small/base", "small/base", "large/base"]
        assert _families(plan)[-1][0] == MLLM_FAMILY
        for p in mllm:
            extra = dict(p.extra)
            assert extra["modality"] == "vision" and p.role == "finetune"
            assert 0 < extra["align_steps"] < p.spec.steps <= 1200
            assert {"ocr", "vrev"} <= set(p.spec.mixture)
        views = {dict(p.extra)["view"] for p in mllm if not dict(p.extra)["control"]}
        assert views == {"top", "bottom"}  # the two fusion members see different bands


def test_quick_mllm_training_is_tens_of_steps():
    assert all(p.spec.steps < 50 for p in zoo_plan(True) if p.family == MLLM_FAMILY)


def test_the_pages_default_selection_leaves_the_llava_members_out():
    from pages._shared import default_selection

    models = [{"path": "small/base", "family": "small", "role": "base", "parent": None},
              {"path": "small/upper", "family": "small", "role": "finetune",
               "parent": "small/base"},
              {"path": "mllm/top", "family": MLLM_FAMILY, "role": "finetune",
               "parent": "small/base"}]
    chosen = default_selection({"models": models})
    assert [p.rsplit("/", 2)[-2:] for p in chosen["finetunes"]] == [["small", "upper"]]


def test_every_member_trains_with_the_same_options_and_the_family_data_seed():
    """The fusion members differ in their view only: the same options (ours) and one data seed
    for the family, so their LM deltas answer the same batches."""
    keys = ("distractors", "anchor", "second_rendering", "data_seed", "lm_lr_scale",
            "position_gap", "align_steps", "align_lr")
    for quick in (True, False):
        mllm = [dict(p.extra) for p in zoo_plan(quick) if p.family == MLLM_FAMILY]
        assert all(m["data_seed"] == "family" for m in mllm)
        assert len({tuple(m[k] for k in keys) for m in mllm}) == 1
        assert 0 < mllm[0]["lm_lr_scale"] <= 1 and mllm[0]["anchor"] > 0


def test_the_family_data_seed_must_be_given():
    import pytest

    from engine.errors import ConfigError
    from engine.zoo.mllm import build_member

    item = next(p for p in zoo_plan(True) if p.family == MLLM_FAMILY)
    with pytest.raises(ConfigError, match="family data seed"):
        build_member(item, None, 0)
