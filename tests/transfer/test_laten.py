"""LaTen's pieces: attribution against a hand computation on a one-layer model, rank pairing,
the translator at zero injecting nothing, the control's vectors keeping the teacher's norms,
and the injection touching only the located rows and columns."""

from __future__ import annotations

import torch

from engine.transfer.laten import KINDS, LaTenParams, Translator, deltas, knowledge, n_units, pair_sites
from engine.transfer.locate import Located, locate, top_layers, top_units
from tests.transfer.test_postpkt import tiny_llama


class CharTok:
    """Ids = 3 + position in the alphabet, <bos> = 1 first."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) - 97) % 17 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_ffn_attribution_matches_a_hand_computation_on_one_layer():
    model = tiny_llama(seed=4, layers=1)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()  # attention adds nothing: h_mid = h_in
    tok = CharTok()
    loc = locate(model, tok, [("abc=", "cba.")])     # "." stripped: target 'a', input "abc=cb"
    ids = tok("abc=cba")["input_ids"]
    t, inp = ids[-1], ids[:-1]
    w = {k: v.double() for k, v in model.state_dict().items()}
    h = w["model.embed_tokens.weight"][inp[-1]]       # the residual at the last position
    p = "model.layers.0."
    x = h / torch.sqrt(h.pow(2).mean() + model.config.rms_norm_eps) * w[p + "post_attention_layernorm.weight"]
    m = torch.nn.functional.silu(w[p + "mlp.gate_proj.weight"] @ x) * (w[p + "mlp.up_proj.weight"] @ x)
    ffn_out = w[p + "mlp.down_proj.weight"] @ m
    sigma = (h + ffn_out).std()

    def lp(v):
        return torch.log_softmax((v * w["model.norm.weight"] / sigma) @ w["lm_head.weight"].mT, -1)[..., t]

    expected = torch.stack([lp(h + m[k] * w[p + "mlp.down_proj.weight"][:, k]) - lp(h)
                            for k in range(m.numel())])
    torch.testing.assert_close(loc.ffn[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loc.layer_ffn[0], lp(h + ffn_out) - lp(h), rtol=1e-4, atol=1e-5)
    assert abs(float(loc.layer_attn[0])) < 1e-6 and float(loc.attn.abs().max()) < 1e-6
    # two examples: scores add
    both = locate(model, tok, [("abc=", "cba."), ("abc=", "cba.")])
    torch.testing.assert_close(both.ffn, 2 * loc.ffn)


def _located(layer_scores, ffn, attn):
    return Located(torch.tensor(layer_scores, dtype=torch.float64) / 2,
                   torch.tensor(layer_scores, dtype=torch.float64) / 2,
                   torch.tensor(ffn, dtype=torch.float64), torch.tensor(attn, dtype=torch.float64))


def test_layers_pair_by_rank_in_index_order_and_units_best_first():
    loc_t = _located([0.5, 3.0, 1.0], [[1, 2, 3, 4]] * 3, [[4, 3, 2]] * 3)
    loc_s = _located([2.0, 1.0], [[4, 1, 3, 2]] * 2, [[1, 2, 3]] * 2)
    sites = pair_sites(loc_t, loc_s, 2, 2, 1)
    assert [(s["t"], s["s"]) for s in sites] == [(1, 0), (2, 1)]  # monotone
    assert sites[0]["t_ffn"].tolist() == [3, 2] and sites[0]["s_ffn"].tolist() == [0, 2]
    assert sites[0]["t_attn"].tolist() == [0] and sites[0]["s_attn"].tolist() == [2]
    assert top_layers(torch.tensor([1.0, 9.0, 5.0, 7.0]), 2) == [1, 3]
    assert top_units(torch.tensor([1.0, 9.0, 5.0]), 5).tolist() == [1, 2, 0]


def _setup():
    teacher, student = tiny_llama(seed=5, hidden=24, layers=3, ffn=40), tiny_llama(seed=6)
    n_ffn, n_attn = n_units(student.config, 0.25)
    gen = torch.Generator().manual_seed(0)
    loc_t = Located(torch.rand(3, generator=gen), torch.rand(3, generator=gen),
                    torch.rand(3, 40, generator=gen), torch.rand(3, 24, generator=gen))
    loc_s = Located(torch.rand(2, generator=gen), torch.rand(2, generator=gen),
                    torch.rand(2, 32, generator=gen), torch.rand(2, 16, generator=gen))
    sites = pair_sites(loc_t, loc_s, 2, n_ffn, n_attn)
    state_t = {k: v.detach() for k, v in teacher.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    return state_t, shapes, sites, (n_ffn, n_attn)


def test_zero_translator_injects_nothing_and_injection_touches_only_located_sites():
    state_t, shapes, sites, (n_ffn, n_attn) = _setup()
    assert (n_ffn, n_attn) == (8, 4)
    know = knowledge(state_t, sites)
    assert know[0]["up"].shape == (8, 24) and know[0]["o"].shape == (4, 24)
    zero = torch.nn.ModuleDict({k: Translator(24, 16, 1.0, torch.Generator().manual_seed(0)) for k in KINDS})
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    delta, penalty = deltas(zero, sites, know, shapes)
    assert all(float(d.abs().max()) == 0.0 for d in delta.values()) and float(penalty) == 0.0
    live = torch.nn.ModuleDict({k: Translator(24, 16, 0.3, torch.Generator().manual_seed(1)) for k in KINDS})
    delta, penalty = deltas(live, sites, know, shapes)
    assert float(penalty) > 0
    site = sites[0]
    up = delta[f"model.layers.{site['s']}.mlp.up_proj.weight"]
    touched = set(torch.nonzero(up.abs().sum(1)).flatten().tolist())
    assert touched <= set(site["s_ffn"].tolist()) and touched
    down = delta[f"model.layers.{site['s']}.mlp.down_proj.weight"]
    assert set(torch.nonzero(down.abs().sum(0)).flatten().tolist()) <= set(site["s_ffn"].tolist())
    torch.testing.assert_close(up[site["s_ffn"][0]], live["up"](know[0]["up"])[0])


def test_control_vectors_keep_the_teacher_norms_but_not_its_directions():
    state_t, _, sites, _ = _setup()
    real = knowledge(state_t, sites)
    fake = knowledge(state_t, sites, random_like=torch.Generator().manual_seed(3))
    for r, f in zip(real, fake):
        for kind in KINDS:
            torch.testing.assert_close(f[kind].norm(dim=1), r[kind].norm(dim=1))
            cos = torch.nn.functional.cosine_similarity(f[kind], r[kind], dim=1)
            assert float(cos.abs().max()) < 0.99


def test_params_defaults_are_the_papers():
    p = LaTenParams()
    assert (p.n_extract, p.n_align, p.align_per_step, p.rate, p.lr, p.penalty) == (20, 80, 15, 0.1, 3e-4, 1000.0)
