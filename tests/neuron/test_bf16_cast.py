"""What NxDI's bf16 cast does to each port, emulated on CPU.

On device, ``DecoderModelInstance.load_module`` (``cast_type="config"``) runs
``model._apply(floating -> bf16)`` and then puts every parameter whose name ends in ``scale`` back
to fp32; NxDI's CPU mode (``to_cpu``) runs ``model.bfloat16()`` instead. The CPU tests elsewhere run
fp32, so neither is seen there. tests/neuron/test_nxdi_cpu.py runs the ``to_cpu`` form through NxDI;
this file applies the ``load_module`` rule, which needs no NxDI.
"""

from __future__ import annotations

import pytest
import torch

from neuron_helpers import prompt
from test_ports import FAMILIES, runner


def load_module_cast(model: torch.nn.Module) -> None:
    """NxDI 4bcdc54 ``DecoderModelInstance.load_module``'s dtype rule for torch_dtype=bf16."""
    model._apply(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)
    for name, param in model.named_parameters():
        if name.endswith("scale"):
            param.data = param.data.to(torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_parameter_is_caught_by_the_scale_rule(checkpoint, family):
    """A "*scale" parameter would come back fp32 and meet bf16 weights (Gemma 4's router scale did)."""
    model = runner(checkpoint, family).model
    assert [n for n, _ in model.named_parameters() if n.endswith("scale")] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_states_stay_fp32_through_the_cast(checkpoint, family):
    r = runner(checkpoint, family, batch_size=2)
    load_module_cast(r.model)
    dtypes = [t.dtype for t in r.model.past_key_values]
    for kind, dtype in zip(r.model.state_kinds, dtypes):
        assert dtype == (torch.float32 if kind in ("ssm", "recurrent") else torch.bfloat16), (kind, dtype)
    r.model.bfloat16()  # to_cpu's form
    assert [t.dtype for t in r.model.past_key_values] == dtypes


@pytest.mark.parametrize("family", FAMILIES)
def test_cast_port_is_as_close_to_transformers_fp32_as_transformers_bf16(checkpoint, hf_model, family):
    """Prefill + 8 teacher-forced decode steps after the cast. Per position, max |logit diff| from
    transformers fp32; averaged over the 9 positions, the port's is at most 2x transformers' own
    bf16 run's. (A mean, not a max: one bf16 routing flip - an expert chosen differently from a
    near-tied router logit - moves one position's logits by ~0.03 on Qwen3.5's tiny model. Measured
    ratios of the means: granite 0.97, qwen3_5 1.6 (one flip), gemma4 0.97.)"""
    from transformers import AutoModelForCausalLM

    hf_bf16 = AutoModelForCausalLM.from_pretrained(checkpoint(family), dtype=torch.bfloat16).eval()
    seq = prompt(21, seed=5)
    low = runner(checkpoint, family, batch_size=2)
    load_module_cast(low.model)
    got = low.prefill([seq], [1], all_logits=False)[0, -1]
    port_err, hf_err = [], []
    for step in range(9):
        with torch.no_grad():
            ref = hf_model(family)(torch.tensor([seq])).logits[0, -1]
            other = hf_bf16(torch.tensor([seq])).logits[0, -1].float()
        port_err.append((got.float() - ref).abs().max().item())
        hf_err.append((other - ref).abs().max().item())
        seq.append(int(ref.argmax()))
        if step < 8:
            got = low.decode([seq[-1]], [len(seq) - 1], [1])[0, -1]
    assert sum(port_err) <= 2 * sum(hf_err), (port_err, hf_err)
