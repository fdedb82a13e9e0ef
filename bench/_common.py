"""Pieces the benchmark scripts share: the README section writers and the Llama tensor layout
of the generated ~270M-parameter models."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


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
