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
    norm-local:   Granite's gated RMSNorm over each rank's channels only (no sum over ranks);
    state-cast:   (bf16 runs) the fp32 recurrent states rounded to bf16 by NxDI's cast, for comparison."""
    import torch

    from vllm_hybrid_neuron.neuron import granite, qwen3_5_moe

    if name == "fused-concat":
        def concat(parts, tp, dim=0):
            return torch.cat([w for w, *_ in parts], dim)
        granite.shard_fused = qwen3_5_moe.shard_fused = concat
    elif name == "norm-local":
        granite.reduce_sum = lambda x, tp: x * tp  # local sum scaled as if every rank's were equal
    elif name == "state-cast":  # recurrent states follow the whole-model cast (bf16), as without the pin
        from vllm_hybrid_neuron.neuron.hybrid import HybridModelMixin
        del HybridModelMixin._apply
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
    dtype = getattr(torch, os.environ.get("HARNESS_DTYPE", "float32"))
    neuron_config = app_class.get_neuron_config_cls()(
        on_cpu=True, tp_degree=tp, batch_size=2, seq_len=int(os.environ.get("HARNESS_SEQ_LEN", "64")), torch_dtype=dtype)
    config = app_class.get_config_cls()(neuron_config, load_config=base.load_pretrained_config(model_dir))
    app = app_class(model_dir, config)
    if dtype == torch.bfloat16 and tp > 1:
        # NxDI's to_cpu refuses bf16 at TP > 1 ("gloo does not natively support bfloat16"); the
        # torch here all-reduces bf16 over gloo. Build as fp32, then do what to_cpu does for bf16:
        # .bfloat16() on the model (loading the fp32 checkpoint into bf16 parameters rounds it
        # exactly as its checkpoint cast would; the port's _apply keeps the recurrent states fp32).
        neuron_config.torch_dtype = torch.float32
        app.to_cpu()
        neuron_config.torch_dtype = dtype
        for wrapper in app.models:
            wrapper.model.bfloat16()
            for module in wrapper.model.modules():  # NxD layers remember their build dtype (ParallelEmbedding
                # casts its output to it at TP > 1): give them the one to_cpu would have built with
                if type(module).__module__.startswith("neuronx_distributed") and getattr(module, "dtype", None) == torch.float32:
                    module.dtype = dtype
    else:
        app.to_cpu()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers' own bf16 run, measured the same way: the yardstick for the port's bf16 error
    hf_low = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval() if dtype != torch.float32 else None
    state_dtypes = sorted({str(t.dtype) for t in app.models[0].model.past_key_values})

    ids = prompt(11, seed=3)
    slot = torch.tensor([1], dtype=torch.int32)
    n = len(ids)
    out = app.forward(input_ids=torch.tensor([ids], dtype=torch.int32),
                      attention_mask=torch.ones(1, n, dtype=torch.int32),
                      position_ids=torch.arange(n, dtype=torch.int32)[None], seq_ids=slot)
    max_diff, max_lp_diff, tokens_equal, hf_low_tokens_equal = 0.0, 0.0, True, True
    hf_low_diff, hf_low_lp_diff = 0.0, 0.0
    decode_diffs, hf_low_decode_diffs = [], []
    seq = list(ids)
    for step in range(steps + 1):
        got = out.logits.reshape(-1, out.logits.shape[-1])[-1].float()  # (V,)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1]  # (V,)
            low = hf_low(torch.tensor([seq])).logits[0, -1].float() if hf_low is not None else ref
        max_diff = max(max_diff, (got - ref).abs().max().item())
        decode_diffs.append((got - ref).abs().max().item())
        max_lp_diff = max(max_lp_diff, (got.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item())
        hf_low_diff = max(hf_low_diff, (low - ref).abs().max().item())
        hf_low_decode_diffs.append((low - ref).abs().max().item())
        hf_low_lp_diff = max(hf_low_lp_diff, (low.log_softmax(-1) - ref.log_softmax(-1)).abs().max().item())
        tokens_equal &= int(got.argmax()) == int(ref.argmax())
        hf_low_tokens_equal &= int(low.argmax()) == int(ref.argmax())
        if step == steps:
            break
        seq.append(int(ref.argmax()))
        pos = len(seq) - 1
        out = app.forward(input_ids=torch.tensor([[seq[-1]]], dtype=torch.int32),
                          attention_mask=torch.ones(1, pos + 1, dtype=torch.int32),
                          position_ids=torch.tensor([[pos]], dtype=torch.int32), seq_ids=slot)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"family": family, "tp": tp, "dtype": str(dtype).split(".")[-1], "steps": steps,
                          "max_logit_diff": max_diff, "max_logprob_diff": max_lp_diff,
                          "hf_same_dtype_max_logit_diff": hf_low_diff,
                          "hf_same_dtype_max_logprob_diff": hf_low_lp_diff,
                          "hf_same_dtype_tokens_equal": hf_low_tokens_equal,
                          # mean over the last quarter of steps: how far the error has grown by then
                          "late_mean_logit_diff": sum(decode_diffs[-(steps // 4 + 1):]) / (steps // 4 + 1),
                          "hf_same_dtype_late_mean_logit_diff":
                              sum(hf_low_decode_diffs[-(steps // 4 + 1):]) / (steps // 4 + 1),
                          "state_dtypes": state_dtypes, "tokens_equal": tokens_equal}))


if __name__ == "__main__":
    main()
