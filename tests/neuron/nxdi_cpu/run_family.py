"""Run in a subprocess: one port through the real NxDI application on CPU, against transformers fp32.

usage: python -m tests.neuron.nxdi_cpu.run_family FAMILY MODEL_DIR [DECODE_STEPS]
       python -m torch.distributed.run --nproc-per-node TP -m tests.neuron.nxdi_cpu.run_family ...
NxDI's own CPU mode: NeuronConfig(on_cpu=True), application to_cpu() (gloo; world size 1, or
WORLD_SIZE ranks started by torchrun, tp_degree = WORLD_SIZE), application forward()
(ModelWrapper's CPU path, every rank in step). Only rank 0 prints. Prefill of one prompt into slot 1 of a batch-2
model, then greedy decode of that slot alone (NxDI pads the batch with a row for slot 0).
Prints one JSON line: max |logit diff| over prefill and every decode step, and whether the greedy
tokens agree.
"""

from __future__ import annotations

import json
import os
import sys


def _apply_break(name: str) -> None:
    """Deliberate tensor-parallel mistakes, to show the TP check fails on them (no effect at TP=1):
    fused-concat: fused projections (Mamba2 in_proj, GDN in_proj_qkv) written in HF order, not rank-major;
    norm-local:   Granite's gated RMSNorm over each rank's channels only (no sum over ranks)."""
    import torch

    from vllm_hybrid_neuron.neuron import granite, qwen3_5_moe

    if name == "fused-concat":
        def concat(parts, tp, dim=0):
            return torch.cat([w for w, *_ in parts], dim)
        granite.shard_fused = qwen3_5_moe.shard_fused = concat
    elif name == "norm-local":
        granite.reduce_sum = lambda x, tp: x * tp  # local sum scaled as if every rank's were equal
    elif name:
        raise ValueError(f"HARNESS_BREAK={name!r}: unknown")


def main() -> None:
    family, model_dir = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    sys.path[:0] = [os.environ["NXDI_SRC"], os.environ["NXD_SRC"]]
    from tests.neuron.nxdi_cpu import standins

    standins.install()
    import torch
    from transformers import AutoModelForCausalLM

    from tests.neuron.neuron_helpers import app_cls, prompt
    from vllm_hybrid_neuron.neuron import base

    _apply_break(os.environ.get("HARNESS_BREAK", ""))
    app_class = app_cls(family)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    neuron_config = app_class.get_neuron_config_cls()(
        on_cpu=True, tp_degree=tp, batch_size=2, seq_len=64, torch_dtype=torch.float32)
    config = app_class.get_config_cls()(neuron_config, load_config=base.load_pretrained_config(model_dir))
    app = app_class(model_dir, config)
    app.to_cpu()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    ids = prompt(11, seed=3)
    slot = torch.tensor([1], dtype=torch.int32)
    n = len(ids)
    out = app.forward(input_ids=torch.tensor([ids], dtype=torch.int32),
                      attention_mask=torch.ones(1, n, dtype=torch.int32),
                      position_ids=torch.arange(n, dtype=torch.int32)[None], seq_ids=slot)
    max_diff, tokens_equal = 0.0, True
    seq = list(ids)
    for step in range(steps + 1):
        got = out.logits.reshape(-1, out.logits.shape[-1])[-1]  # (V,)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1]  # (V,)
        max_diff = max(max_diff, (got - ref).abs().max().item())
        tokens_equal &= int(got.argmax()) == int(ref.argmax())
        if step == steps:
            break
        seq.append(int(ref.argmax()))
        pos = len(seq) - 1
        out = app.forward(input_ids=torch.tensor([[seq[-1]]], dtype=torch.int32),
                          attention_mask=torch.ones(1, pos + 1, dtype=torch.int32),
                          position_ids=torch.tensor([[pos]], dtype=torch.int32), seq_ids=slot)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"family": family, "tp": tp, "dtype": "float32", "steps": steps,
                          "max_logit_diff": max_diff, "tokens_equal": tokens_equal}))


if __name__ == "__main__":
    main()
