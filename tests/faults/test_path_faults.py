"""reliability.md item 8: user-typed paths outside the roots, '~', symlink escape, FIFO, device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import PathNotAllowedError
from engine.paths import resolve_user_path
from tests.io.builders import snapshot


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "models"
    (root / "base").mkdir(parents=True)
    return root


def refused(tmp_path, text, roots, *needles, **kw):
    before = snapshot(tmp_path)
    with pytest.raises(PathNotAllowedError) as info:
        resolve_user_path(text, roots, **kw)
    message = str(info.value)
    assert str(text).strip() in message  # names exactly what was typed
    for needle in needles:
        assert needle in message, message
    assert snapshot(tmp_path) == before


def test_outside_the_allowed_roots(tmp_path, root):
    (tmp_path / "private").mkdir()
    refused(tmp_path, str(tmp_path / "private"), [root], "outside the allowed roots")
    refused(tmp_path, "/", [root], "outside the allowed roots")
    refused(tmp_path, str(tmp_path / "private" / "new"), [root], "outside", must_exist=False)


def test_prefix_sibling_is_not_inside(tmp_path, root):
    sibling = tmp_path / "models-evil"  # shares the string prefix of the root
    sibling.mkdir()
    refused(tmp_path, str(sibling), [root], "outside the allowed roots")


@pytest.mark.parametrize("text", ["~", "~/models", "~root/x"])
def test_tilde_is_never_expanded(tmp_path, root, text):
    home_like = Path(os.path.expanduser("~"))
    refused(tmp_path, text, [root, home_like], "'~' is not expanded")


def test_traversal(tmp_path, root):
    refused(tmp_path, f"{root}/base/../../", [root], "'..'")
    refused(tmp_path, f"{root}/base/..", [root], "'..'")  # refused even though it lands in the root


def test_symlink_escape(tmp_path, root):
    outside = tmp_path / "secret"
    outside.mkdir()
    os.symlink(outside, root / "link")
    refused(tmp_path, str(root / "link"), [root], "outside the allowed roots", "resolves to")
    os.symlink(outside / "new", root / "dangling")
    refused(tmp_path, str(root / "dangling" / "x"), [root], "outside", must_exist=False)


def test_fifo_refused_without_blocking(tmp_path, root):
    os.mkfifo(root / "pipe")
    refused(tmp_path, str(root / "pipe"), [root], "FIFO")


def test_device_file_refused():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null on this platform")
    with pytest.raises(PathNotAllowedError, match="device") as info:
        resolve_user_path("/dev/null", ["/dev"])
    assert "/dev/null" in str(info.value)
