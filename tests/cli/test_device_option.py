"""``--device`` of every command that computes: a device that is not cpu/cuda, or cuda on a
machine without one, is a one-line error (exit 2) before anything is written."""

from __future__ import annotations

import pytest
import torch

from engine.__main__ import main
from engine.device import resolve_device
from engine.errors import ParameterError


def test_resolve_device():
    assert resolve_device(None) == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "gpu0", "meta"):
        with pytest.raises(ParameterError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_compress_and_merge_refuse_a_bad_device_in_one_line(tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tests.compress.helpers import make_pair

    base, ft, _, _ = make_pair(tmp_path / "pair")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\n"
                      f"models:\n  - model: {ft}\n    parameters: {{weight: 1.0}}\n")
    for argv, out in ((["compress", "--base", str(base), "--finetuned", str(ft), "--method", "svd",
                        "--ratio", "8", "--out", str(tmp_path / "art"), "--device", device], "art"),
                      (["merge", str(recipe), "--out", str(tmp_path / "merged"), "--device", device],
                       "merged")):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and "device" in err[-1], err
        assert not (tmp_path / out).exists()
