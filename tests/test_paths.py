"""resolve_user_path: what a user types is resolved inside the allowed roots or refused."""

from __future__ import annotations

import os

import pytest

from engine.errors import PathNotAllowedError
from engine.paths import resolve_user_path


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "models"
    (root / "base").mkdir(parents=True)
    (root / "base" / "config.json").write_text("{}")
    return root


def test_paths_inside_a_root_resolve(root):
    assert resolve_user_path(str(root / "base"), [root]) == (root / "base").resolve()
    assert resolve_user_path(f"  {root / 'base'}/ ", [root], kind="dir") == (root / "base").resolve()
    assert resolve_user_path(root / "base" / "config.json", [root], kind="file").name == "config.json"
    assert resolve_user_path(str(root), [root]) == root.resolve()


def test_symlink_inside_the_root_is_followed(root):
    os.symlink(root / "base", root / "alias")
    assert resolve_user_path(str(root / "alias"), [root]) == (root / "base").resolve()


def test_nonexistent_path_only_when_allowed(root):
    with pytest.raises(PathNotAllowedError, match="does not exist"):
        resolve_user_path(str(root / "new"), [root])
    assert resolve_user_path(str(root / "new" / "out"), [root], must_exist=False) == \
        (root / "new" / "out").resolve()


def test_second_root_counts(root, tmp_path):
    other = tmp_path / "exports"
    other.mkdir()
    assert resolve_user_path(str(other), [root, other]) == other.resolve()


def test_kind_mismatch(root):
    with pytest.raises(PathNotAllowedError, match="expected a file"):
        resolve_user_path(str(root / "base"), [root], kind="file")
    with pytest.raises(PathNotAllowedError, match="expected a folder"):
        resolve_user_path(str(root / "base" / "config.json"), [root], kind="dir")


@pytest.mark.parametrize("text,reason", [("", "empty"), ("   ", "empty"), ("relative/base", "absolute"),
                                         ("a\x00b", "NUL")])
def test_malformed_input(root, text, reason):
    with pytest.raises(PathNotAllowedError, match=reason):
        resolve_user_path(text, [root])


def test_no_existing_root_allows_nothing(root, tmp_path):
    with pytest.raises(PathNotAllowedError, match="no allowed roots"):
        resolve_user_path(str(root / "base"), [tmp_path / "absent"])
