"""Tensor-parallel checkpoint layout, on CPU without neuronx-distributed.

NxD gives rank r the r-th of ``tp`` contiguous pieces of each sharded tensor. Here the converted
checkpoint is cut that way and each piece is compared with what rank r's forward reads, derived
independently of ``tp.py``: rank r owns query-like heads [r n/tp, (r+1) n/tp); the shared heads it
needs are the ones those heads map to (GQA: head h reads KV head h // (Hq / Hkv); Mamba2: group
h // (H / G); GDN: value head h reads key head h // (Hv / Hk)). The same layout through NxD's own
sharding and collectives is run by tests/neuron/test_nxdi_cpu.py (needs the NxD sources).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from neuron_helpers import app_cls
from vllm_hybrid_neuron.neuron.tp import head_split, per_rank
from vllm_hybrid_neuron.tools.tiny import HUB_GRANITE_LAYER_TYPES


def hf_state_and_config(model_dir: str, tp: int):
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if "layer_types" in raw:  # the hub's Granite spelling, as the port's config normalises it
        names = {hub: name for name, hub in HUB_GRANITE_LAYER_TYPES.items()}
        raw["layer_types"] = [names.get(t, t) for t in raw["layer_types"]]
    config = SimpleNamespace(**raw, neuron_config=SimpleNamespace(tp_degree=tp))
    sd = {k.removeprefix("model."): v for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    return sd, config


def piece(t: torch.Tensor, tp: int, r: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(tp, dim)[r]  # what NxD's checkpoint sharding gives rank r


def rows(t: torch.Tensor, heads, width: int) -> torch.Tensor:
    return torch.cat([t[h * width:(h + 1) * width] for h in heads])


def owned(n: int, tp: int, r: int) -> list[int]:
    return list(range(r * n // tp, (r + 1) * n // tp))


def needed(q_heads: list[int], n_q: int, n_shared: int) -> list[int]:
    return sorted({h // (n_q // n_shared) for h in q_heads})


@pytest.mark.parametrize("tp", [2, 4])
def test_granite_mamba_and_attention_pieces(checkpoint, tp):
    hf, config = hf_state_and_config(checkpoint("granite"), tp)
    out = app_cls("granite").convert_hf_to_neuron_state_dict(dict(hf), config)
    H, P, G, N = config.mamba_n_heads, config.mamba_d_head, config.mamba_n_groups, config.mamba_d_state
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // Hq
    a = config.layer_types.index("full_attention")
    m = next(i for i, kind in enumerate(config.layer_types) if kind != "full_attention")
    z, x, B, C, dt = hf[f"layers.{m}.mamba.in_proj.weight"].split([H * P, H * P, G * N, G * N, H])
    conv = hf[f"layers.{m}.mamba.conv1d.weight"][:, 0]
    cx, cB, cC = conv.split([H * P, G * N, G * N])
    for r in range(tp):
        heads = owned(H, tp, r)
        groups = needed(heads, H, G)
        want = torch.cat([rows(z, heads, P), rows(x, heads, P), rows(B, groups, N), rows(C, groups, N),
                          rows(dt, heads, 1)])
        assert torch.equal(piece(out[f"layers.{m}.mixer.in_proj.weight"], tp, r), want)
        want = torch.cat([rows(cx, heads, P), rows(cB, groups, N), rows(cC, groups, N)])
        assert torch.equal(piece(out[f"layers.{m}.mixer.conv_weight.weight"], tp, r), want)
        for name in ("dt_bias", "A_log", "D"):
            assert torch.equal(piece(out[f"layers.{m}.mixer.{name}.weight"], tp, r),
                               rows(hf[f"layers.{m}.mamba.{name}"], heads, 1))
        assert torch.equal(piece(out[f"layers.{m}.mixer.norm_weight.weight"], tp, r),
                           rows(hf[f"layers.{m}.mamba.norm.weight"], heads, P))
        q_heads = owned(Hq, tp, r)
        assert torch.equal(piece(out[f"layers.{a}.mixer.q_proj.weight"], tp, r),
                           rows(hf[f"layers.{a}.self_attn.q_proj.weight"], q_heads, hd))
        for proj in ("k_proj", "v_proj"):
            assert torch.equal(piece(out[f"layers.{a}.mixer.{proj}.weight"], tp, r),
                               rows(hf[f"layers.{a}.self_attn.{proj}.weight"], needed(q_heads, Hq, Hkv), hd))
    # row-parallel out_proj is cut along its input dim, in HF order: channels [r I/tp, (r+1) I/tp)
    assert torch.equal(out[f"layers.{m}.mixer.out_proj.weight"], hf[f"layers.{m}.mamba.out_proj.weight"])


@pytest.mark.parametrize("tp", [2, 4])
def test_qwen3_5_gdn_pieces(checkpoint, tp):
    hf, config = hf_state_and_config(checkpoint("qwen3_5"), tp)
    out = app_cls("qwen3_5").convert_hf_to_neuron_state_dict(dict(hf), config)
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    Dk, Dv = config.linear_key_head_dim, config.linear_value_head_dim
    i = config.layer_types.index("linear_attention")
    p = f"layers.{i}.linear_attn."
    q, k, v = hf[p + "in_proj_qkv.weight"].split([Hk * Dk, Hk * Dk, Hv * Dv])
    for r in range(tp):
        v_heads = owned(Hv, tp, r)
        k_heads = needed(v_heads, Hv, Hk)
        want = torch.cat([rows(q, k_heads, Dk), rows(k, k_heads, Dk), rows(v, v_heads, Dv)])
        assert torch.equal(piece(out[f"layers.{i}.mixer.in_proj_qkv.weight"], tp, r), want)
        assert torch.equal(piece(out[f"layers.{i}.mixer.in_proj_z.weight"], tp, r),
                           rows(hf[p + "in_proj_z.weight"], v_heads, Dv))
        for name in ("in_proj_b.weight", "in_proj_a.weight", "dt_bias", "A_log"):
            key = f"layers.{i}.mixer." + (name if name.startswith("in_proj") else name + ".weight")
            assert torch.equal(piece(out[key], tp, r), rows(hf[p + name], v_heads, 1)), name


def test_shared_expert_pieces(checkpoint):
    tp = 2
    hf, config = hf_state_and_config(checkpoint("granite"), tp)
    out = app_cls("granite").convert_hf_to_neuron_state_dict(dict(hf), config)
    gate, up = hf["layers.0.shared_mlp.input_linear.weight"].chunk(2)  # HF fused [gate; up]
    I = gate.shape[0]
    for r in range(tp):  # GluMLP column-parallel: rank r holds [gate_r; up_r]
        want = torch.cat([rows(gate, owned(I, tp, r), 1), rows(up, owned(I, tp, r), 1)])
        assert torch.equal(piece(out["layers.0.moe.shared.gate_up.weight"], tp, r), want)


def test_head_counts_that_cannot_be_split_name_the_field():
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tp_degree=4"):
        per_rank(6, 4, "num_attention_heads")
    with pytest.raises(ValueError, match="num_key_value_heads=3: neither"):
        head_split(3, 4, "num_key_value_heads")
    assert head_split(1, 4, "num_global_key_value_heads") == [[0], [0], [0], [0]]
