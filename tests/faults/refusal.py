"""The bad-input suite's one assertion: an action is refused with exactly ``error_type``, one
line naming every needle, and nothing on disk changed."""

from __future__ import annotations

import pytest

from tests.io.builders import snapshot


def assert_refused(tmp_path, action, error_type, *needles):
    """Run ``action()``; assert the refusal (see the module docstring); return the error."""
    before = snapshot(tmp_path)
    with pytest.raises(error_type) as info:
        action()
    message = str(info.value)
    assert type(info.value) is error_type, f"{type(info.value).__name__}: {message}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n" not in message
    assert snapshot(tmp_path) == before
    return info.value
