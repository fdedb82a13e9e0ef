"""Issue 19, items 2, 3, 4 (export zip) and 12: hostile recipes, recipe paths outside the
allowed roots, symlinks in the export folder, and an app that would serve beyond loopback.

Each case asserts the error type, that the message names the recipe (file, key or line), and
that nothing was written: no output folder, no job, no manifest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.util import patch_config_options

from engine.errors import ConfigError, ParameterError, PathNotAllowedError
from engine.recipe import load_recipe, parse_recipe_text
from tests.io.builders import snapshot, tiny_tensors, write_model

ROOT = Path(__file__).resolve().parents[2]


def alias_bomb(models: list[str]) -> str:
    """About 600 bytes that expand to 9**8 (43 million) items: each anchor is a list of nine
    aliases of the previous one, hidden in a parameter the method ignores."""
    lines = ["merge_method: linear", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: 0.5}}" for m in models]
    lines += ["parameters:", "  notes:", "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def open_page(monkeypatch, tmp_path, quick_zoo):
    """``open_page("pages/x.py")``: the app run once on that page, its home under ``tmp_path``
    and the quick zoo as its zoo (the only allowed roots: the zoo and the exports)."""
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.delenv("DELTA_WORKBENCH_MODEL_ROOTS", raising=False)
    monkeypatch.chdir(ROOT)

    def run(page: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.switch_page(page).run()
        assert not at.exception
        return at

    return run


def small_recipe(*extra: str) -> str:
    return "\n".join(["merge_method: linear", "models:", "  - model: /nowhere/a",
                      "  - model: /nowhere/b", *extra]) + "\n"


# ---------------------------------------------------------------- 2: the strict recipe loader
def test_alias_bomb_is_refused_at_parse_time_quickly():
    text = alias_bomb(["/nowhere/a", "/nowhere/b"])
    assert len(text.encode()) < 700
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_recipe_text(text, source="bomb.yml")
    assert time.perf_counter() - started < 2
    message = str(info.value)
    assert message.startswith("bomb.yml: ") and "anchor &l0" in message and "line 9" in message
    assert "\n" not in message


def test_alias_bomb_is_refused_by_the_cli_with_nothing_written(tmp_path):
    recipe = tmp_path / "bomb.yml"
    recipe.write_text(alias_bomb([str(tmp_path / "a"), str(tmp_path / "b")]))
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "engine", "merge", str(recipe), "--out",
                           str(tmp_path / "out"), "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(recipe) in lines[0] and "anchors and aliases are refused" in lines[0]
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


def test_alias_bomb_in_a_job_spec_is_refused_at_submit_and_nothing_is_queued(tmp_path):
    from engine.jobs import JobManager, JobSpec

    manager = JobManager(tmp_path / "jobs", gpu=False)
    with pytest.raises(ConfigError) as info:
        manager.submit(JobSpec(kind="merge", params={
            "recipe_yaml": alias_bomb(["/nowhere/a", "/nowhere/b"]), "out": str(tmp_path / "out")}))
    assert "anchor &l0" in str(info.value)
    assert snapshot(tmp_path) == ["jobs"]


def test_alias_bomb_on_the_export_page_is_refused_and_nothing_is_queued(open_page, tmp_path):
    at = open_page("pages/export.py")
    at.text_area(key="export_recipe").input(alias_bomb(["/nowhere/a", "/nowhere/b"]))
    at.text_input(key="export_out_name").input("bombed")
    next(b for b in at.button if b.label == "Export").click().run()
    assert not at.exception
    assert at.error and "anchors and aliases are refused" in at.error[0].value
    home = tmp_path / "home"
    assert not (home / "exports" / "bombed").exists()
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path):
    recipe = tmp_path / "deep.yml"
    recipe.write_text(small_recipe("parameters:", "  x: " + "[" * 3000 + "]" * 3000))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert str(recipe) in str(info.value) and "nested deeper than 64" in str(info.value)
    assert "line 6" in str(info.value)


def test_non_utf8_recipe_is_a_config_error_naming_the_file(tmp_path):
    recipe = tmp_path / "latin1.yml"
    recipe.write_bytes(small_recipe("name: caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith(f"{recipe}: ") and "not UTF-8" in str(info.value)


def test_duplicate_keys_are_refused_naming_the_key_and_line():
    with pytest.raises(ConfigError) as info:
        parse_recipe_text(small_recipe("merge_method: ties"), source="dup.yml")
    message = str(info.value)
    assert message.startswith("dup.yml: ") and "duplicate key 'merge_method'" in message
    assert "line 5" in message and "first at line 1" in message
    # a duplicate inside a model's parameters too
    with pytest.raises(ConfigError, match="duplicate key 'weight'"):
        parse_recipe_text("merge_method: linear\nmodels:\n  - model: /a\n    parameters:\n"
                          "      weight: 1\n      weight: 2\n")


def test_oversized_recipe_is_refused_before_it_is_parsed(tmp_path):
    recipe = tmp_path / "huge.yml"
    recipe.write_text(small_recipe("name: '" + "x" * (300 * 1024) + "'"))
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert str(recipe) in str(info.value) and "too large" in str(info.value)


def test_huge_integers_are_refused_not_a_value_error_or_minutes_of_arithmetic():
    # 5,000 digits: int() itself raises ValueError (CPython's digit limit), a traceback before
    with pytest.raises(ConfigError, match="integer of 5000 characters"):
        parse_recipe_text(small_recipe("seed: " + "1" * 5000), source="int.yml")
    # sexagesimal (YAML 1.1: 1:0:0 is 3600): each part multiplies a growing big integer
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="too long"):
        parse_recipe_text(small_recipe("seed: 1" + ":0" * 60000), source="sexagesimal.yml")
    assert time.perf_counter() - started < 5


def test_compress_cli_param_values_go_through_the_strict_loader():
    from engine.cli.compress_cmd import parse_params

    with pytest.raises(ParameterError) as info:
        parse_params(["groups=[&a [1, 1, 1], *a, *a]"])
    assert str(info.value).startswith("--param groups: ") and "anchor &a" in str(info.value)
    with pytest.raises(ParameterError, match="nested deeper"):
        parse_params(["groups=" + "[" * 3000 + "]" * 3000])
    assert parse_params(["rank=8", "inner.k=[1, 2]"]) == {"rank": 8, "inner": {"k": [1, 2]}}


def test_a_pages_json_box_with_deep_nesting_does_not_end_the_page(monkeypatch):
    monkeypatch.chdir(ROOT)

    def script():
        import streamlit as st
        from pydantic import BaseModel

        from pages._forms import params_form

        class Params(BaseModel):
            counts: list[int] = [1]

        st.session_state["value"] = params_form(Params, key="p")

    at = AppTest.from_function(script, default_timeout=60).run()
    at.text_input[0].input("[" * 5000 + "]" * 5000).run()
    assert not at.exception
    # handed back as text: the method's validation then names the field
    assert at.session_state["value"] == {"counts": "[" * 5000 + "]" * 5000}


# ---------------------------------------------------------------- 3: recipe paths and the roots
@pytest.fixture
def outside_models(tmp_path):
    outside = tmp_path / "outside"
    for name, seed in (("a", 1), ("b", 2)):
        write_model(outside / name, tiny_tensors(seed=seed))
    return outside


def test_export_page_refuses_a_recipe_naming_folders_outside_the_roots(open_page, tmp_path,
                                                                       outside_models):
    at = open_page("pages/export.py")
    recipe = (f"merge_method: linear\nmodels:\n  - model: {outside_models / 'a'}\n"
              f"    parameters: {{weight: 0.5}}\n  - model: {outside_models / 'b'}\n"
              "    parameters: {weight: 0.5}\n")
    at.text_area(key="export_recipe").input(recipe)
    at.text_input(key="export_out_name").input("stolen")
    next(b for b in at.button if b.label == "Export").click().run()
    assert not at.exception
    assert at.error, "the recipe was accepted"
    message = at.error[0].value
    assert "models[0].model" in message and "outside the allowed roots" in message
    assert str(outside_models / "a") in message
    home = tmp_path / "home"
    assert not (home / "exports" / "stolen").exists()
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())
    assert sorted(p.name for p in outside_models.iterdir()) == ["a", "b"]


def test_export_page_does_not_expand_a_tilde_in_a_recipe(open_page, tmp_path, monkeypatch,
                                                         quick_zoo):
    monkeypatch.setenv("HOME", str(quick_zoo))  # '~/small/base' would be a real zoo model
    at = open_page("pages/export.py")
    at.text_area(key="export_recipe").input(
        "merge_method: task_arithmetic\nbase_model: ~/small/base\nmodels:\n"
        f"  - model: {quick_zoo / 'small' / 'upper'}\n    parameters: {{weight: 1.0}}\n")
    at.text_input(key="export_out_name").input("tilde")
    next(b for b in at.button if b.label == "Export").click().run()
    assert not at.exception and at.error
    assert "base_model" in at.error[0].value and "'~' is not expanded" in at.error[0].value
    assert not (tmp_path / "home" / "exports" / "tilde").exists()


def test_a_merge_job_checks_every_recipe_key_against_the_roots(tmp_path, monkeypatch,
                                                               outside_models):
    from engine.jobs import JobManager, JobSpec

    root = tmp_path / "root"
    write_model(root / "base", tiny_tensors(seed=0))
    (root / "escape").symlink_to(outside_models / "a")  # inside by name, outside once resolved
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(tmp_path / "nozoo"))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(root))
    manager = JobManager(tmp_path / "home" / "jobs", gpu=False)
    head = f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
    cases = [
        ("models[1].model", head + f"  - model: {root / 'base'}\n  - model: {root / 'escape'}\n"),
        ("tokenizer_source", head + f"  - model: {root / 'base'}\n"
                                    f"tokenizer_source: {outside_models / 'b'}\n"),
        ("models[0].model", "merge_method: linear\nmodels:\n  - model: ../outside/a\n"
                            f"  - model: {root / 'base'}\n"),
    ]
    for key, recipe in cases:
        with pytest.raises(PathNotAllowedError) as info:
            manager.submit(JobSpec(kind="merge", params={"recipe_yaml": recipe,
                                                         "out": str(tmp_path / "out")}))
        assert f"recipe key {key}: " in str(info.value), str(info.value)
    assert not any((tmp_path / "home" / "jobs").iterdir())
    assert not (tmp_path / "out").exists()


def test_the_cli_does_not_expand_a_tilde_either(tmp_path, monkeypatch):
    from engine.merge.executor import plan_merge

    write_model(tmp_path / "m", tiny_tensors())
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = parse_recipe_text("merge_method: linear\nmodels:\n  - model: ~/m\n  - model: ~/m\n")
    with pytest.raises(PathNotAllowedError) as info:
        plan_merge(recipe, recipe_dir=tmp_path / "elsewhere")
    assert str(info.value).startswith("~/m: recipe key models[0].model: '~' is not expanded")


def test_check_recipe_paths_returns_the_resolved_folders(tmp_path):
    from engine.recipe import check_recipe_paths

    root = tmp_path / "root"
    write_model(root / "a", tiny_tensors())
    recipe = parse_recipe_text(f"merge_method: linear\nmodels:\n  - model: {root / 'a'}\n"
                               "  - model: a\n")
    with pytest.raises(PathNotAllowedError, match="recipe key models\\[1\\].model: path must be absolute"):
        check_recipe_paths(recipe, [root])
    assert check_recipe_paths(recipe, [root], recipe_dir=root) == {
        "models[0].model": (root / "a").resolve(), "models[1].model": (root / "a").resolve()}


# ---------------------------------------------------------------- 4: the export zip
def test_export_page_lists_and_zips_no_symlink(open_page, tmp_path, monkeypatch):
    import streamlit

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY")
    exports = tmp_path / "home" / "exports"
    good = exports / "good"
    good.mkdir(parents=True)
    (good / "config.json").write_text("{}")
    (good / "sub").mkdir()
    (good / "sub" / "notes.txt").write_text("ours")
    (good / "linked-dir").symlink_to(secret)
    (good / "linked-file").symlink_to(secret / "id_rsa")
    (good / "delta_workbench_manifest.json").symlink_to(secret / "id_rsa")
    (exports / "evil").symlink_to(secret)  # a whole "export" that is a link out
    zips: dict[str, bytes] = {}
    real = streamlit.download_button

    def recording(label, data, *args, **kwargs):
        zips[kwargs["file_name"]] = data
        return real(label, data, *args, **kwargs)

    monkeypatch.setattr(streamlit, "download_button", recording)
    at = open_page("pages/export.py")
    assert not any("evil" in m.value for m in at.markdown)
    assert sorted(zips) == ["good.zip"]
    names = zipfile.ZipFile(BytesIO(zips["good.zip"])).namelist()
    assert sorted(names) == ["good/config.json", "good/sub/notes.txt"]
    assert b"PRIVATE KEY" not in zips["good.zip"]
    assert any("manifest cannot be read" in w.value for w in at.warning)


# ---------------------------------------------------------------- 12: loopback only
@pytest.mark.parametrize("address", ["0.0.0.0", None, "::", "192.168.1.10"])
def test_app_refuses_to_serve_beyond_loopback(open_page, address, monkeypatch):
    open_page("pages/models.py")  # served on 127.0.0.1 (config.toml): the page runs
    monkeypatch.delenv("DELTA_WORKBENCH_ALLOW_REMOTE", raising=False)
    with patch_config_options({"server.address": address}):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert at.error and "loopback interface only" in at.error[0].value
    assert "DELTA_WORKBENCH_ALLOW_REMOTE=1" in at.error[0].value
    assert not at.title  # no page ran
    monkeypatch.setenv("DELTA_WORKBENCH_ALLOW_REMOTE", "1")
    with patch_config_options({"server.address": address}):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception and not at.error and at.title


def test_launcher_passes_loopback_and_the_project_settings():
    import tomllib

    from engine.cli.app_cmd import streamlit_argv

    argv = streamlit_argv(port=8600)
    assert argv[:5] == [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py")]
    assert "--server.address=127.0.0.1" in argv and "--server.port=8600" in argv
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    for section, table in config.items():
        for key in table:
            assert any(a.startswith(f"--{section}.{key}=") for a in argv), (section, key)
    assert "--server.enableXsrfProtection=true" in argv


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_launcher_started_from_another_folder_listens_on_loopback_only(tmp_path):
    from tests.app.test_serve import _free_port, _listening_addresses

    port = _free_port()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, DELTA_WORKBENCH_HOME=str(tmp_path / "home"),
               DELTA_WORKBENCH_ZOO=str(tmp_path / "zoo"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_app.py"), "--port", str(port)],
                            cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body == "ok", proc.stdout.read().decode() if proc.poll() is not None else "no answer"
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing on 0.0.0.0 or ::
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not (elsewhere / ".streamlit").exists()


# ---------------------------------------------------------------- the class, not the instance
YAML_LOADS = {"yaml.load", "yaml.safe_load", "yaml.full_load", "yaml.unsafe_load", "yaml.load_all",
              "yaml.safe_load_all", "yaml.compose", "yaml.SafeLoader", "yaml.Loader"}


def yaml_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every YAML parse in ``source`` that bypasses engine.textparse's strict loader."""
    import ast

    from tests.faults.test_static_rules import _dotted

    tree = ast.parse(source, filename=filename)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            aliases.update({a.asname or a.name: f"yaml.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name == "yaml"})
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            head, _, rest = _dotted(node.func).partition(".")
            full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            if full in YAML_LOADS:
                found.append(f"{filename}:{node.lineno}: {full}")
    return found


def test_the_yaml_checker_catches_what_it_should():
    assert yaml_loads("import yaml\nyaml.safe_load(t)\n")
    assert yaml_loads("import yaml as y\ny.load(t, Loader=y.SafeLoader)\n")
    assert yaml_loads("from yaml import safe_load\nsafe_load(t)\n")
    assert not yaml_loads("import yaml\nyaml.safe_dump(d)\ntext = 'yaml.safe_load(x)'\n")


def test_shipped_code_parses_yaml_only_through_the_strict_loader():
    from tests.faults.test_static_rules import shipped_python_files

    strict = ROOT / "engine" / "textparse.py"
    found = [v for path in shipped_python_files() if path != strict
             for v in yaml_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
