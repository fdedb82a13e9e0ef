"""``scope: blocks`` and ``ratio_over``: only the transformer blocks' matrices are compressed;
everything else comes back as base + fp16(delta), exactly; both ratios are bytes on disk of
what they name; bad values are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.__main__ import main
from engine.compress import Artifact, DeltaServer, compress, rebuild_state_dict
from engine.compress.scope import artifact_summary, in_scope
from engine.errors import ArtifactError, ParameterError
from tests.compress.helpers import folder_size, make_pair

BLOCK = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight")
KEPT = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope")
    base, ft, base_t, ft_t = make_pair(root)
    return {"base": base, "ft": ft, "base_t": base_t, "ft_t": ft_t, "root": root}


def exact(pair, name) -> torch.Tensor:
    """The fine-tune at fp16 precision of its delta: base + fp16(ft - base), in float32."""
    delta = pair["ft_t"][name].float() - pair["base_t"][name].float()
    return pair["base_t"][name].float() + delta.half().float()


def test_the_blocks_rule_names_block_matrices_only():
    for name in ("model.layers.0.mlp.up_proj.weight", "transformer.h.3.attn.c_attn.weight",
                 "encoder.block.5.layer.1.DenseReluDense.wi.weight"):
        assert in_scope(name, (4, 4), "blocks") and in_scope(name, (4, 4), "all")
    for name in ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight",
                 "model.layers_extra.3.weight"):
        assert not in_scope(name, (4, 4), "blocks") and in_scope(name, (4, 4), "all")


@pytest.mark.parametrize("over,ratio", [("compressed", 8), ("artifact", 2.5)])
def test_blocks_keep_the_rest_exactly_and_count_it_on_disk(pair, tmp_path, over, ratio):
    art = tmp_path / "art"
    result = compress(pair["base"], pair["ft"], art, "svd", ratio=ratio,
                      params={"scope": "blocks", "ratio_over": over}, device="cpu")
    rebuilt = rebuild_state_dict(art, pair["base"], device="cpu")
    for name in KEPT:  # exactly the fine-tune at fp16 precision of its delta
        assert torch.equal(rebuilt[name], exact(pair, name)), name
    assert set(result.tensors) == set(BLOCK) | {"model.embed_tokens.weight"}
    assert result.tensors["model.embed_tokens.weight"]["stored"].startswith("fp16")
    for name in BLOCK:  # compressed: a truncated rank, not the exact delta
        assert "rank" in result.tensors[name] and not torch.equal(rebuilt[name], exact(pair, name))
    # on disk: every file of the folder, the kept fp16 sections included
    entries = sum(t.numel() for t in pair["base_t"].values())
    assert result.bytes == folder_size(art) and result.ratio == pytest.approx(2 * entries / folder_size(art))
    # over the compressed set: 2 bytes x their entries / their sections' bytes, from the file
    artifact = Artifact(art)
    names = [n for n, t in pair["base_t"].items() if t.ndim == 2]  # section order = layout order
    sizes = {n: int(artifact.offsets[i + 1] - artifact.offsets[i]) for i, n in enumerate(names)}
    assert sizes["model.embed_tokens.weight"] == 2 * pair["base_t"]["model.embed_tokens.weight"].numel()
    compressed = sum(pair["base_t"][n].numel() for n in BLOCK)
    assert result.compressed_entries == compressed
    assert result.ratio_compressed == pytest.approx(2 * compressed / sum(sizes[n] for n in BLOCK))
    aimed = result.ratio_compressed if over == "compressed" else result.ratio
    assert abs(aimed / ratio - 1) <= 0.10 and not result.warnings
    assert artifact_summary(art) == {"on_disk": pytest.approx(result.ratio),
                                     "compressed_set": pytest.approx(result.ratio_compressed),
                                     "scope": "blocks", "warnings": []}
    # the server rebuilds the same tensors
    server = DeltaServer(pair["base"], device="cpu")
    server.add("ft", art)
    state = server.materialize("ft")
    assert all(torch.equal(state[n], rebuilt[n]) for n in rebuilt)


def test_scope_all_compresses_every_matrix_and_reports_both_ratios(pair, tmp_path):
    result = compress(pair["base"], pair["ft"], tmp_path / "art", "svd", ratio=8, device="cpu")
    assert all("rank" in info for info in result.tensors.values())
    assert result.scope == "all" and result.compressed_entries == sum(
        t.numel() for t in pair["base_t"].values() if t.ndim == 2)
    assert result.ratio_compressed > result.ratio  # the manifest and 1-D deltas are not in it


def test_an_unreachable_on_disk_target_says_why(pair, tmp_path):
    # the kept embedding alone (a third of the entries, 2 bytes each) exceeds 8x on disk
    result = compress(pair["base"], pair["ft"], tmp_path / "art", "svd", ratio=8,
                      params={"scope": "blocks"}, device="cpu")
    assert any("out of reach" in w and "outside the scope" in w and "ratio_over: compressed" in w
               for w in result.warnings)


def test_dbms_scalars_leave_the_kept_tensors_alone(pair, tmp_path):
    art = tmp_path / "art"
    compress(pair["base"], pair["ft"], art, "dbms", ratio=8,
             params={"inner": "svd", "alpha": 0.1, "scale": 0.5, "scope": "blocks",
                     "ratio_over": "compressed"}, device="cpu")
    rebuilt = rebuild_state_dict(art, pair["base"], device="cpu")
    for name in KEPT:
        assert torch.equal(rebuilt[name], exact(pair, name)), name
    name = BLOCK[0]
    assert not torch.allclose(rebuilt[name], exact(pair, name), atol=1e-3)  # shifted and scaled


@pytest.mark.parametrize("params,needle", [
    ({"scope": "layers"}, "scope"),
    ({"ratio_over": "disk"}, "ratio_over"),
    ({"inner": "svd", "inner_params": {"scope": "blocks"}}, "inner_params.scope"),
])
def test_bad_option_values_are_refused_naming_the_key(pair, tmp_path, params, needle):
    method = "dbms" if "inner" in params else "svd"
    with pytest.raises(ParameterError, match=needle):
        compress(pair["base"], pair["ft"], tmp_path / "art", method, ratio=8,
                 params={**params, **({"alpha": 0, "scale": 1} if method == "dbms" else {})})
    assert not (tmp_path / "art").exists()


def test_cli_scope_flags(pair, tmp_path, capsys):
    code = main(["compress", "--base", str(pair["base"]), "--finetuned", str(pair["ft"]),
                 "--method", "svd", "--ratio", "8", "--scope", "blocks", "--ratio-over", "compressed",
                 "--out", str(tmp_path / "art"), "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["params"]["scope"] == "blocks" and summary["scope"] == "blocks"
    assert abs(summary["ratio_compressed"] / 8 - 1) <= 0.10 and summary["ratio"] < 3
    code = main(["compress", "--base", str(pair["base"]), "--finetuned", str(pair["ft"]),
                 "--method", "svd", "--ratio", "8", "--scope", "blocks", "--param", "scope=all",
                 "--out", str(tmp_path / "art2"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--scope or --param scope" in err and not (tmp_path / "art2").exists()
    with pytest.raises(SystemExit):
        main(["compress", "--base", str(pair["base"]), "--finetuned", str(pair["ft"]),
              "--method", "svd", "--ratio", "8", "--scope", "embeddings", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'embeddings'" in capsys.readouterr().err


def test_a_manifest_whose_kept_sections_disagree_is_refused(pair, tmp_path):
    art = tmp_path / "art"
    compress(pair["base"], pair["ft"], art, "svd", ratio=8,
             params={"scope": "blocks", "ratio_over": "compressed"}, device="cpu")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["scope"]["kept_sections"] = []
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest scope"):
        rebuild_state_dict(art, pair["base"], device="cpu")


def test_kept_section_of_the_wrong_size_is_refused():
    from engine.compress.scope import exact_delta, exact_section

    data = exact_section(torch.tensor([[1.0, -2.0], [0.5, 65504.0]]))
    assert np.array_equal(exact_delta(data, (2, 2), "t", "cpu").numpy(),
                          np.array([[1.0, -2.0], [0.5, 65504.0]], dtype=np.float32))
    with pytest.raises(ArtifactError, match="expected 8"):
        exact_delta(data[:-2], (2, 2), "t", "cpu")
    with pytest.raises(ValueError, match="overflows float16"):
        exact_section(torch.tensor([1e6]))


def test_kept_overflow_names_the_tensor(tmp_path):
    base, ft, base_t, ft_t = make_pair(tmp_path / "p")
    from engine.io import ModelWriter

    folder = Path(tmp_path / "big")
    ft_t = dict(ft_t)
    ft_t["model.embed_tokens.weight"] = ft_t["model.embed_tokens.weight"].clone()
    ft_t["model.embed_tokens.weight"][0, 0] = 1e6
    with ModelWriter(folder, config=json.loads((ft / "config.json").read_text()),
                     extra_files={"tokenizer_config.json": {"model_max_length": 64}}) as w:
        for name, t in ft_t.items():
            w.add_tensor(name, t)
    with pytest.raises(ArtifactError, match="overflows float16") as info:
        compress(base, folder, tmp_path / "art", "svd", ratio=8,
                 params={"scope": "blocks", "ratio_over": "compressed"}, device="cpu")
    assert "model.embed_tokens.weight" in str(info.value)
