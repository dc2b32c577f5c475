"""Each port against transformers (fp32, CPU): prefill logits, greedy decode, padding, slots, state carry."""

from __future__ import annotations

import pytest
import torch

from neuron_helpers import app_cls, assert_close_to_scale, pearson, prompt
from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

FAMILIES = ["granite", "qwen3_5", "gemma4"]
# Port-specific knobs that select the long-context code path (e.g. several SSD chunks).
# Gemma 4 has none: every prompt here longer than its sliding window (32) already slides.
CHUNKED = {"granite": {"ssd_chunk_size": 16}, "qwen3_5": {"gdn_chunk_size": 16}, "gemma4": {}}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def runner(checkpoint, family, **kw) -> CpuRunner:
    return CpuRunner(app_cls(family), checkpoint(family), **kw)


@pytest.mark.parametrize("path", ["single_scan", "chunked"])
def test_prefill_logits_match_transformers(checkpoint, hf_model, family, path):
    ids = prompt(45, seed=1)
    r = runner(checkpoint, family, **(CHUNKED[family] if path == "chunked" else {}))
    got = r.prefill([ids], [0])[0]  # (L, V)
    with torch.no_grad():
        ref = hf_model(family)(torch.tensor([ids])).logits[0]
    assert pearson(got, ref) >= 0.999
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_greedy_decode_matches_transformers_generate(checkpoint, hf_model, family):
    ids = prompt(47, seed=2)  # longer than Gemma 4's sliding window; 47 + 16 fits seq_len 64
    r = runner(checkpoint, family, batch_size=2)
    mine = r.greedy(ids, 16, seq_id=1)
    with torch.no_grad():
        ref = hf_model(family).generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                        min_new_tokens=16)[0, len(ids):].tolist()
    assert mine == ref


def test_right_padded_batch_equals_single_runs(checkpoint, family):
    prompts = [prompt(n, seed=n) for n in (2, 37, 9, 1)]  # shorter than the conv width too
    batch = runner(checkpoint, family, batch_size=4)
    got = batch.prefill(prompts, [3, 0, 2, 1])  # (4, 37, V)
    nxt = [int(got[b, len(p) - 1].argmax()) for b, p in enumerate(prompts)]
    step = batch.decode(nxt, [len(p) for p in prompts], [3, 0, 2, 1])  # (4, 1, V)
    for b, p in enumerate(prompts):
        single = runner(checkpoint, family)
        ref = single.prefill([p], [0])[0]
        assert_close_to_scale(got[b, :len(p)], ref, 1e-5)
        ref_step = single.decode([nxt[b]], [len(p)], [0])[0]
        assert_close_to_scale(step[b], ref_step, 1e-5)


def test_state_of_one_slot_never_changes_another(checkpoint, family):
    r = runner(checkpoint, family, batch_size=3)
    r.prefill([prompt(7, seed=3), prompt(12, seed=4)], [0, 2])
    before = [p.detach().clone() for p in r.model.past_key_values]
    r.prefill([prompt(20, seed=5)], [1])
    r.decode([5], [20], [1])
    changed_slot1 = False
    for old, new in zip(before, r.model.past_key_values):
        assert torch.equal(old[0], new[0]) and torch.equal(old[2], new[2])
        changed_slot1 |= not torch.equal(old[1], new[1])
    assert changed_slot1


def test_state_carried_into_decode_equals_one_prefill(checkpoint, family):
    ids = prompt(50, seed=6)  # decode steps cross Gemma 4's sliding window (32)
    split = 13
    full = runner(checkpoint, family, batch_size=2, **CHUNKED[family])
    ref = full.prefill([ids], [1])[0]  # (50, V)
    inc = runner(checkpoint, family, batch_size=2, **CHUNKED[family])
    first = inc.prefill([ids[:split]], [1])[0]
    steps = [inc.decode([ids[t]], [t], [1])[0, 0] for t in range(split, len(ids))]
    torch.testing.assert_close(torch.cat([first, torch.stack(steps)]), ref, rtol=1e-4, atol=1e-4)
    # ...and the states themselves agree (KV caches on the positions written).
    kinds = full.model.state_kinds
    assert len(kinds) == len(full.model.past_key_values)
    for kind, a, b in zip(kinds, full.model.past_key_values, inc.model.past_key_values):
        if kind in ("k", "v"):  # (slots, Hkv, S, D): only positions written so far
            a, b = a[:, :, :len(ids)], b[:, :, :len(ids)]
        assert_close_to_scale(a[1], b[1], 1e-5)


def test_gemma4_conditional_generation_checkpoint_serves_the_text_model(
        gemma4_conditional_checkpoint, hf_model):
    from vllm_hybrid_neuron.neuron import registration

    r = CpuRunner(registration.insert_ports({})["gemma4"]["causal-lm"], gemma4_conditional_checkpoint)
    assert r.missing == [] and r.unexpected == []
    assert r.config.layer_head_dims == [32, 64, 32, 64] and r.config.layer_kv_heads == [2, 1, 2, 1]
    ids = prompt(45, seed=1)
    got = r.prefill([ids], [0])[0]
    with torch.no_grad():
        ref = hf_model("gemma4")(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_gemma4_rejects_unported_variants(checkpoint):
    for override in ({"hidden_size_per_layer_input": 16}, {"num_kv_shared_layers": 2},
                     {"use_bidirectional_attention": "all"}):
        with pytest.raises(ValueError, match="not supported by the Gemma 4 port"):
            runner(checkpoint, "gemma4", **override)


def test_gemma4_router_scales_match_transformers(checkpoint, tmp_path):
    """The tiny checkpoint leaves router.scale / router.per_expert_scale at ones; randomise them
    so the router formula (norm * scale / sqrt(D), per-expert weight scale) is really compared."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(checkpoint("gemma4"), tmp_path, dirs_exist_ok=True)
    sd = load_file(f"{tmp_path}/model.safetensors")
    g = torch.Generator().manual_seed(7)
    for key in [k for k in sd if k.endswith(("router.scale", "router.per_expert_scale"))]:
        sd[key] = 0.5 + torch.rand(sd[key].shape, generator=g)
    save_file(sd, f"{tmp_path}/model.safetensors", metadata={"format": "pt"})
    ids = prompt(45, seed=1)
    got = CpuRunner(app_cls("gemma4"), str(tmp_path)).prefill([ids], [0])[0]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()(
            torch.tensor([ids])).logits[0]
    assert pearson(got, ref) >= 0.999
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_granite_hub_layer_type_spellings(checkpoint, tmp_path):
    """The hub's Granite 4.0-H config.json says "mamba" / "attention" (transformers 4.57, NxDI's pin,
    keeps them; the tiny builder writes them so too): same port, same logits as with transformers
    5's names; an unknown spelling raises, naming layer_types."""
    import json
    import shutil

    hub = tmp_path / "hub"
    shutil.copytree(checkpoint("granite"), hub)
    config = json.loads((hub / "config.json").read_text())
    from vllm_hybrid_neuron.tools.tiny import HUB_GRANITE_LAYER_TYPES as spell

    config["layer_types"] = [spell.get(t, t) for t in config["layer_types"]]
    assert set(config["layer_types"]) == {"mamba", "attention"}
    (hub / "config.json").write_text(json.dumps(config))
    renamed = tmp_path / "transformers5"  # the same checkpoint with transformers 5's names
    shutil.copytree(hub, renamed)
    names = {v: k for k, v in spell.items()}
    (renamed / "config.json").write_text(json.dumps(
        {**config, "layer_types": [names[t] for t in config["layer_types"]]}))
    ids = prompt(20, seed=7)
    want = CpuRunner(app_cls("granite"), str(renamed)).prefill([ids], [0])
    got = CpuRunner(app_cls("granite"), str(hub)).prefill([ids], [0])  # transformers 5 renamed them
    assert torch.equal(got, want)
    as_457 = CpuRunner(app_cls("granite"), checkpoint("granite"), layer_types=config["layer_types"])
    assert as_457.config.layer_types != config["layer_types"]  # the port normalised the hub spelling
    assert torch.equal(as_457.prefill([ids], [0]), want)
    # (transformers 5 rejects unknown layer types itself; the port's own check is for 4.57)
    from vllm_hybrid_neuron.neuron import base

    load = base.load_pretrained_config(str(hub))

    def load_with_typo(cfg):
        load(cfg)
        cfg.layer_types = ["mamba2", *cfg.layer_types[1:]]

    app = app_cls("granite")
    nc = app.get_neuron_config_cls()(batch_size=1, seq_len=64, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="layer_types has \\['mamba2'\\]"):
        app.get_config_cls()(nc, load_config=load_with_typo)
