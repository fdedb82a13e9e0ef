"""Bad calibration data for fisher/regmean recipes and for ``compress --calibration``: each a
one-line error naming the file and the recipe key (or option), exit 2, before any model is
loaded, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.__main__ import main
from engine.errors import PathNotAllowedError
from engine.evaluate.own_data import split_of
from engine.recipe import check_recipe_paths, parse_recipe

GOOD = "".join(json.dumps({"prompt": f"rev:{w}=", "answer": w[::-1]}) + "\n"
               for w in ("abc", "hello", "world", "zebra", "mango", "plum", "kiwi", "lemon"))
HELDOUT = "".join(json.dumps({"prompt": p, "answer": "x"}) + "\n"
                  for p in (f"q{i}" for i in range(40)) if split_of(p) == "heldout")

FILES = {
    "missing-answer": (GOOD.encode() + b'{"prompt": "a"}\n', "line 9: 'answer' is missing"),
    "bad-json": (b'{"prompt": "a", "answer": "b"}\n{"prompt"\n', "line 2 is not valid JSON"),
    "empty": (b"", "the file is empty"),
    "non-utf8": (GOOD.encode() + b"\xff\xfe\n", "line 9 is not UTF-8"),
    "one-10mb-line": (b"a" * (10 * 2**20), "line 1 is 10485760 bytes"),
    "only-heldout": (HELDOUT.encode(), "is in the dev split"),
}


@pytest.fixture(scope="module")
def small(quick_zoo):
    root = Path(quick_zoo) / "small"
    return {name: root / name for name in ("base", "reverse", "upper")}


@pytest.fixture
def no_model_loads(monkeypatch):
    import engine.evaluate.loading as loading

    for name in ("load_finetune", "load_model_folder"):
        monkeypatch.setattr(loading, name, lambda *a, **k: pytest.fail("a model was loaded"))


def merge_cli(tmp_path: Path, recipe: dict, capsys) -> str:
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    code = main(["merge", str(tmp_path / "recipe.yml"), "--out", str(tmp_path / "out"), "--quiet",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()
    return err


def recipe_with(small, global_cal=None, own_cal=None, method="regmean") -> dict:
    first = {"model": str(small["reverse"])}
    if own_cal is not None:
        first["parameters"] = {"calibration": own_cal}
    return {"merge_method": method, "parameters": {"calibration": global_cal} if global_cal else {},
            "models": [first, {"model": str(small["upper"])}]}


@pytest.mark.parametrize("case", sorted(FILES))
@pytest.mark.parametrize("where", ["global", "model"])
def test_a_bad_data_file_is_one_line_naming_file_and_recipe_key(small, tmp_path, capsys,
                                                                no_model_loads, case, where):
    data, needle = FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(data)
    cal = {"data": str(path), "n": 2}
    recipe = (recipe_with(small, global_cal=cal) if where == "global"
              else recipe_with(small, own_cal=cal))
    key = ("parameters.calibration.data" if where == "global"
           else "models[0].parameters.calibration.data")
    err = merge_cli(tmp_path, recipe, capsys)
    assert str(path) in err and f"recipe key {key}" in err and needle in err


@pytest.mark.parametrize("cal,needle", [
    ({"data": 3}, "recipe key parameters.calibration.data: a calibration data file is a path"),
    ({"data": ""}, "recipe key parameters.calibration.data: a calibration data file is a path"),
    ({"data": "/no/such/file.jsonl"}, "recipe key parameters.calibration.data: no such calibration data file"),
    ({"data": "~/mine.jsonl"}, "recipe key parameters.calibration.data: '~' is not expanded"),
    ({"data": "GOOD", "m": 3}, "calibration: m: Extra inputs are not permitted"),
])
def test_bad_data_keys_are_refused_before_any_model_loads(small, tmp_path, capsys, no_model_loads,
                                                          cal, needle):
    (tmp_path / "good.jsonl").write_text(GOOD)
    cal = {k: (str(tmp_path / "good.jsonl") if v == "GOOD" else v) for k, v in cal.items()}
    assert needle in merge_cli(tmp_path, recipe_with(small, global_cal=cal), capsys)


def test_a_folder_is_not_a_data_file(small, tmp_path, capsys, no_model_loads):
    err = merge_cli(tmp_path, recipe_with(small, global_cal={"data": str(tmp_path)}), capsys)
    assert "no such calibration data file" in err and str(tmp_path) in err


def test_per_model_calibration_must_be_a_mapping_and_not_beside_a_task(small, tmp_path, capsys,
                                                                       no_model_loads):
    (tmp_path / "good.jsonl").write_text(GOOD)
    err = merge_cli(tmp_path, recipe_with(small, own_cal="mine.jsonl"), capsys)
    assert "model 0's 'calibration' must be a mapping" in err
    recipe = recipe_with(small, own_cal={"data": str(tmp_path / "good.jsonl")})
    recipe["models"][0]["parameters"]["calibration_task"] = "reverse"
    assert "give calibration_task or calibration.data, not both" in merge_cli(tmp_path, recipe, capsys)


def test_app_recipes_keep_data_files_inside_the_allowed_roots(small, tmp_path):
    from engine.jobs.kinds import MergeJobParams

    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.jsonl"
    outside.write_text(GOOD)
    (root / "inside.jsonl").write_text(GOOD)
    (root / "link.jsonl").symlink_to(outside)
    zoo = small["base"].parent
    roots = [root, zoo]
    ok = parse_recipe(recipe_with(small, global_cal={"data": "inside.jsonl"}))
    assert check_recipe_paths(ok, roots, recipe_dir=root)["parameters.calibration.data"] == \
        (root / "inside.jsonl").resolve()
    for data, key_cal in ((str(outside), "global"), (str(root / "link.jsonl"), "model"),
                          (str(root / ".." / "outside.jsonl"), "global"), ("inside.jsonl", "model")):
        recipe = parse_recipe(recipe_with(small, global_cal={"data": data}) if key_cal == "global"
                              else recipe_with(small, own_cal={"data": data}))
        key = ("parameters.calibration.data" if key_cal == "global"
               else "models[0].parameters.calibration.data")
        with pytest.raises(PathNotAllowedError) as info:
            check_recipe_paths(recipe, roots)  # no recipe folder: a relative path is refused too
        assert f"recipe key {key}" in str(info.value) and "\n" not in str(info.value)
    from engine import settings

    original = settings.allowed_roots
    try:
        settings.allowed_roots = lambda: roots
        with pytest.raises(PathNotAllowedError, match="recipe key parameters.calibration.data"):
            MergeJobParams(recipe_yaml=yaml.safe_dump(recipe_with(small, global_cal={"data": str(outside)})),
                           out=str(tmp_path / "out"))
    finally:
        settings.allowed_roots = original


# ---------------------------------------------------------------------- compress --calibration
def compress_cli(small, tmp_path, capsys, *extra) -> str:
    code = main(["compress", "--base", str(small["base"]), "--finetuned", str(small["reverse"]),
                 "--ratio", "16", "--device", "cpu", "--quiet", "--out", str(tmp_path / "art"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "art").exists()
    return err


@pytest.mark.parametrize("case", sorted(FILES))
def test_compress_refuses_a_bad_data_file_in_one_line(small, tmp_path, capsys, case):
    data, needle = FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(data)
    err = compress_cli(small, tmp_path, capsys, "--method", "dbms", "--calibration", str(path))
    assert str(path) in err and "calibration_data" in err and needle in err


def test_compress_calibration_options_that_cannot_apply(small, tmp_path, capsys):
    path = tmp_path / "good.jsonl"
    path.write_text(GOOD)
    assert "--calibration: svd learns nothing" in compress_cli(
        small, tmp_path, capsys, "--method", "svd", "--calibration", str(path))
    assert "distill: true" in compress_cli(
        small, tmp_path, capsys, "--method", "bitdelta", "--param", "distill=false",
        "--calibration", str(path))
    assert "tasks is read by objective task_kl" in compress_cli(
        small, tmp_path, capsys, "--method", "bitdelta", "--param", "tasks=[reverse]")
    assert "give tasks or calibration_data, not both" in compress_cli(
        small, tmp_path, capsys, "--method", "dbms", "--param", "tasks=[reverse]",
        "--calibration", str(path))
    assert "alpha and scale are learned" in compress_cli(
        small, tmp_path, capsys, "--method", "dbms", "--param", "alpha=0", "--param", "scale=1",
        "--calibration", str(path))
    assert "no such file" in compress_cli(
        small, tmp_path, capsys, "--method", "dbms", "--calibration", str(tmp_path / "nope.jsonl")).lower()


def test_compress_keeps_the_data_file_inside_the_allowed_roots(small, tmp_path):
    from engine.compress import compress

    outside = tmp_path / "outside.jsonl"
    outside.write_text(GOOD)
    with pytest.raises(PathNotAllowedError, match="calibration_data: ") as info:
        compress(small["base"], small["reverse"], tmp_path / "art", "dbms", ratio=16,
                 params={"calibration_data": str(outside)}, allowed_roots=[small["base"].parent])
    assert str(outside) in str(info.value)
    assert not (tmp_path / "art").exists()
