"""Pieces the benchmark scripts share: the README section writers and the Llama tensor layout
of the generated ~270M-parameter models."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
RESULTS = Path(__file__).resolve().parent / "results"


def machine_conditions() -> dict:
    """What the numbers were measured on (no host name): cores, load, versions, date."""
    import torch

    return {"cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def describe_machine(m: dict) -> str:
    """One phrase for a README from ``machine_conditions()``'s record."""
    return (f"{m['cores']} cores, load average {m['load_average_1m']:.1f} at the end, torch {m['torch']}, "
            f"measured {m['date']}")


class OtherWork:
    """CPU time the rest of the machine used while a bench ran, without the bench's own processes.

    The load average after a run counts the run itself (a bench that keeps two cores busy leaves
    a 1-minute load near 2 on a 2-core machine whatever else ran), so it cannot tell an idle
    machine from a loaded one. This reads the machine's busy time from /proc/stat at start and
    end and subtracts the CPU time of this process and of its waited-for children
    (``os.times()``): what is left is other work, reported as busy cores on average.
    """

    def __enter__(self) -> "OtherWork":
        self._busy0, self._own0, self._t0 = self._busy(), self._own(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.machine_busy_s = self._busy() - self._busy0
        self.own_cpu_s = self._own() - self._own0
        self.other_cpu_s = max(0.0, self.machine_busy_s - self.own_cpu_s)
        self.other_cores = self.other_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def record(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "machine_busy_cpu_s": round(self.machine_busy_s, 2),
                "own_cpu_s": round(self.own_cpu_s, 2), "other_cpu_s": round(self.other_cpu_s, 2),
                "other_busy_cores": round(self.other_cores, 3)}


def save_results(name: str, record: dict) -> Path:
    """Write a bench's raw numbers to bench/results/NAME.json (atomically: a half-written file
    would break ``--render``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_results(name: str) -> dict:
    """The raw numbers a bench saved with ``save_results``."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path.name}: no saved results; run the bench first")
    return json.loads(path.read_text())


def write_readme_section(section: str, body: str) -> None:
    """Put ``section`` (a ``## `` heading) followed by ``body`` into bench/README.md, replacing
    that section if it is there (up to the next ``## `` heading or ``<!-- `` marker of another
    generated section, which is kept), else appending it."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    if section in text:
        start = text.index(section)
        ends = [i for i in (text.find("\n## ", start + len(section)),
                            text.find("\n<!-- ", start + len(section))) if i != -1]
        nxt = min(ends) if ends else -1
        text = text[:start] + block + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + block
    README.write_text(text)


def write_marked_section(name: str, body: str, readme: Path = README) -> None:
    """Write ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``readme``
    (replacing what is there, else appending): for sections whose body has ``## `` headings of
    its own or that sit among other generated sections."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text)


# Typical settings where a method's defaults alone are not what a user would try first;
# every other method runs with its registry defaults (see ``typical_merge_settings``).
TYPICAL = {
    "ties": ({"weight": 1.0, "density": 0.5}, {}), "dare_linear": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "breadcrumbs": ({"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.5, "gamma": 0.01}, {}),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "fisher": ({}, {"calibration": {"n": 32}}), "regmean": ({}, {"calibration": {"n": 32}}),
    "channel_merging": ({}, {"num_groups": 4}), "sotu": ({"weight": 1.0, "density": 0.2}, {}),
}


def typical_merge_settings(name: str, n: int) -> tuple[int, list[dict], dict]:
    """(fine-tunes used, per-model params, global params) for one method, from the registry:
    at most its ``max_models`` fine-tunes, its form's starting weight, ``t = 0.5`` where a
    method requires an interpolation factor, and the TYPICAL overrides."""
    from engine.merge.registry import get_method

    method = get_method(name)
    used = min(n, method.max_models or n)
    per_model, params = TYPICAL.get(name, ({}, {}))
    per_model = dict(per_model)
    if "weight" in method.model_params_class.model_fields and "weight" not in per_model:
        per_model["weight"] = method.starting_weight(used)
    params = dict(params)
    if "t" in method.params_class.model_fields and method.params_class.model_fields["t"].is_required():
        params["t"] = 0.5
    return used, [dict(per_model) for _ in range(used)], params


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an untied Llama with config ``c`` (hidden_size,
    intermediate_size, vocab_size, num_hidden_layers, num_attention_heads, num_key_value_heads)."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes
