"""LoRA fine-tune read as an adapter vs merged to full weights first: time, peak RSS, disk.

The user holds a base and a PEFT LoRA adapter. Two ways to analyse and merge it:

- adapter path: ``python -m engine analyze --finetuned ADAPTER`` and a recipe naming
  ``BASE+ADAPTER``; each task vector is ``scale * B @ A`` computed module by module.
- merged-first path: what one does without adapter support: PEFT ``merge_and_unload()`` on the
  model loaded in transformers, ``save_pretrained`` a full copy, then the same commands on it.

Each step runs in its own process; peak RSS is that process's ``ru_maxrss`` (os.wait4). The
models are generated (random bf16 Llama weights, random rank-r LoRA factors on every linear
layer), written with our atomic writer; nothing is downloaded.

    python bench/lora_vs_merged.py [--hidden 768 --layers 6 --rank 16] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import llama_shapes, write_marked_section  # noqa: E402
from engine.io import ModelWriter  # noqa: E402
from engine.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lora_vs_merged.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MERGE_FIRST = """
import copy, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, trust_remote_code=False)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def write_models(root: Path, hidden: int, layers: int, rank: int, seed: int = 0) -> dict:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
              "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    shapes = llama_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    with ModelWriter(root / "base", config=config, max_shard_bytes=2**30) as writer:
        for name, shape in shapes.items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            writer.add_tensor(name, t.to(torch.bfloat16))
    adapter_cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
                   "lora_dropout": 0.0, "inference_mode": True}
    with ModelWriter(root / "adapter", config=adapter_cfg, max_shard_bytes=2**62,
                     weights_name=WEIGHTS_NAME, config_name=CONFIG_NAME) as writer:
        for name, shape in shapes.items():
            module = name.rpartition(".")[0]
            if len(shape) == 2 and module.rpartition(".")[2] in TARGETS:
                out_f, in_f = shape
                writer.add_tensor(f"{PREFIX}{module}.lora_A.weight",
                                  (torch.randn(rank, in_f, generator=gen) * 0.01).to(torch.bfloat16))
                writer.add_tensor(f"{PREFIX}{module}.lora_B.weight",
                                  (torch.randn(out_f, rank, generator=gen) * 0.01).to(torch.bfloat16))
    params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    return {"parameters": params, "config": config, "adapter_rank": rank}


def run(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (MiB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode()[-800:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--readme", action="store_true", help="write the bench/README.md section")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        root = Path(tmp)
        info = write_models(root, args.hidden, args.layers, args.rank)
        base, adapter = root / "base", root / "adapter"
        load = os.getloadavg()
        recipe_a = root / "a.yml"
        recipe_a.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\n"
                            f"models:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1.0}}\n")
        rows = {"adapter": {}, "merged_first": {}}
        engine = [py, "-m", "engine"]
        rows["adapter"]["analyze"] = run([*engine, "analyze", "--base", str(base), "--finetuned",
                                          str(adapter), "--json", "--no-cache"], env)
        rows["adapter"]["merge"] = run([*engine, "merge", str(recipe_a), "--out", str(root / "out_a"),
                                        "--quiet"], env)
        rows["merged_first"]["merge_to_full"] = run([py, "-c", MERGE_FIRST, str(base), str(adapter),
                                                     str(root / "full")], env)
        full_bytes = folder_bytes(root / "full")
        recipe_b = root / "b.yml"
        recipe_b.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\n"
                            f"models:\n  - model: {root / 'full'}\n    parameters: {{weight: 1.0}}\n")
        rows["merged_first"]["analyze"] = run([*engine, "analyze", "--base", str(base), "--finetuned",
                                               str(root / "full"), "--json", "--no-cache"], env)
        rows["merged_first"]["merge"] = run([*engine, "merge", str(recipe_b), "--out",
                                             str(root / "out_b"), "--quiet"], env)
        shutil.rmtree(root / "full")
        record = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "torch": torch.__version__, "load_before": [round(x, 2) for x in load],
                              "load_after": [round(x, 2) for x in os.getloadavg()]},
                  "model": {"parameters": info["parameters"], "hidden": args.hidden,
                            "layers": args.layers, "dtype": "bfloat16", "rank": args.rank},
                  "bytes": {"base": folder_bytes(base), "adapter": folder_bytes(adapter),
                            "merged_copy": full_bytes},
                  "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if args.readme:
        write_marked_section("lora-vs-merged", render(record))


def render(r: dict) -> str:
    a, m = r["rows"]["adapter"], r["rows"]["merged_first"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [
        "## LoRA fine-tune: read as an adapter vs merged to full weights first", "",
        f"A {r['model']['parameters'] / 1e6:.0f}M-parameter bf16 Llama ({r['model']['layers']} layers, "
        f"hidden {r['model']['hidden']}) and a rank-{r['model']['rank']} LoRA adapter on every linear "
        f"layer ({mib(r['bytes']['adapter'])}), generated. Each step is its own process; time is wall "
        "clock, memory the process's peak RSS. `python bench/lora_vs_merged.py --readme`; raw numbers "
        "in `bench/results/lora_vs_merged.json` (load average before/after: "
        f"{r['machine']['load_before'][0]}/{r['machine']['load_after'][0]} on "
        f"{r['machine']['cpus']} cores).", "",
        "| step | adapter path | merged-first path |", "|---|---|---|",
        f"| make a full fine-tuned copy (PEFT merge_and_unload + save) | not needed | "
        f"{m['merge_to_full']['seconds']} s, {m['merge_to_full']['peak_rss_mib']:.0f} MiB, "
        f"{mib(r['bytes']['merged_copy'])} on disk |",
        f"| `analyze` (spectra of every task vector) | {a['analyze']['seconds']} s, "
        f"{a['analyze']['peak_rss_mib']:.0f} MiB | {m['analyze']['seconds']} s, "
        f"{m['analyze']['peak_rss_mib']:.0f} MiB |",
        f"| `merge` (task_arithmetic, weight 1, bf16 out) | {a['merge']['seconds']} s, "
        f"{a['merge']['peak_rss_mib']:.0f} MiB | {m['merge']['seconds']} s, "
        f"{m['merge']['peak_rss_mib']:.0f} MiB |",
        f"| total | {a['analyze']['seconds'] + a['merge']['seconds']:.1f} s, no copy | "
        f"{m['merge_to_full']['seconds'] + m['analyze']['seconds'] + m['merge']['seconds']:.1f} s, "
        f"{mib(r['bytes']['merged_copy'])} copy |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
