"""Real mergekit-moe, for the parity test and bench: every config run in one process of
mergekit's own venv (its ``main`` called per config, a failure recorded, not raised), and the
outputs compared tensor by tensor after mapping mergekit's per-expert names (its Qwen MoE
writes ``mlp.experts.{i}.gate_proj.weight``, ...) onto transformers 5's fused layout, ours."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

DRIVER = """
import json, sys, traceback
from mergekit.scripts.moe import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        main([config, out, "--device", "cpu"], standalone_mode=False)
        print("MKRESULT " + json.dumps({"out": out, "ok": True}), flush=True)
    except BaseException as err:
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        print("MKRESULT " + json.dumps({"out": out, "ok": False, "error": last}), flush=True)
"""


def mergekit_moe() -> str | None:
    """The ``mergekit-moe`` executable named by ``MERGEKIT_MOE`` (None: parity skips)."""
    exe = os.environ.get("MERGEKIT_MOE")
    return exe if exe and Path(exe).is_file() else None


def run_mergekit_moe(exe: str, jobs: list[tuple[Path, Path]], timeout: int = 1800) -> dict[str, dict]:
    """``{out: {"ok", "error"}}`` for each ``(config, out)``, all in one mergekit process."""
    python = Path(exe).parent / "python"
    args = [str(p) for job in jobs for p in job]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), "-c", DRIVER, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("MKRESULT "):
            item = json.loads(line[len("MKRESULT "):])
            results[item["out"]] = item
    for _, out in jobs:
        results.setdefault(str(out), {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        if results[str(out)]["ok"] and not (Path(out) / "config.json").exists():
            results[str(out)] = {"ok": False, "error": "no output written"}
    return results


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert names stacked into ``experts.gate_up_proj`` / ``experts.down_proj``."""
    out, parts = {}, {}
    for name, tensor in tensors.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = tensor
        else:
            parts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = tensor
    for prefix, pieces in parts.items():
        n = 1 + max(i for i, _ in pieces)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([pieces[(i, "gate")], pieces[(i, "up")]])
                                                     for i in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([pieces[(i, "down")] for i in range(n)])
    return out


def compare(ours: Path, theirs: Path) -> dict:
    """Every tensor: the largest relative difference ``|a - b| / |b|`` (Frobenius), the router
    rows' alone, and the names only one side has."""
    a, b = fused(read_folder(ours)), fused(read_folder(theirs))
    worst, worst_gate, worst_name = 0.0, 0.0, None
    for name in sorted(set(a) & set(b)):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            return {"ok": False, "error": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
        rel = float((x - y).norm() / y.norm()) if float(y.norm()) > 0 else float(x.norm())
        if rel > worst:
            worst, worst_name = rel, name
        if name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
            worst_gate = max(worst_gate, rel)
    return {"ok": True, "tensors": len(set(a) & set(b)), "max_rel": worst, "max_rel_gates": worst_gate,
            "worst": worst_name, "only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a))}


def loads(folder: Path) -> bool:
    """transformers loads the folder and runs a forward pass with finite logits."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
        with torch.no_grad():
            return bool(torch.isfinite(model(torch.tensor([[1, 40, 41, 42]])).logits).all())
    except Exception:  # noqa: BLE001 - any failure to load is a "no"
        return False


def copy_tokenizer(src: Path, dest: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
