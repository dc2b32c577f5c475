"""Run in a subprocess: one port built the way NxDI builds it for the device, in bf16, on CPU.

usage: python -m tests.neuron.nxdi_cpu.load_module_check FAMILY MODEL_DIR [ods]
NxDI's ``DecoderModelInstance(model_cls, config).load_module()`` (its whole-model cast,
``cast_type="config"``: everything bf16, then parameters named ``*scale`` back to fp32) and
``.get()`` (the input/output alias map the traced graph would use). Then the module runs eagerly:
the bf16 checkpoint NxDI's loader would give (``checkpoint_loader_fn``'s cast), an 11-token
prefill into slot 1 and 4 decode steps, each new state taken from the output index the alias map
names (what aliasing does on device). With ``ods``: on-device sampling with ``output_logits``
(NxDI's output order [tokens, logits, *states], aliases from 2).
Prints one JSON line: alias offsets, state dtypes, parameter dtypes, logit error against
transformers fp32 and transformers' own bf16 error.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    family, model_dir = sys.argv[1], sys.argv[2]
    ods = len(sys.argv) > 3 and sys.argv[3] == "ods"
    sys.path[:0] = [os.environ["NXDI_SRC"], os.environ["NXD_SRC"]]
    from tests.neuron.nxdi_cpu import standins

    standins.install()
    import torch
    import torch.distributed as dist
    from neuronx_distributed.parallel_layers.parallel_state import initialize_model_parallel
    from neuronx_distributed_inference.models.config import OnDeviceSamplingConfig
    from neuronx_distributed_inference.models.model_wrapper import DecoderModelInstance
    from transformers import AutoModelForCausalLM

    from tests.neuron.neuron_helpers import app_cls, prompt
    from vllm_hybrid_neuron.neuron import base

    os.environ["NXD_CPU_MODE"] = "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", world_size=1, rank=0)
    initialize_model_parallel(tensor_model_parallel_size=1, skip_collective_init=True)

    app_class = app_cls(family)
    extra = {"on_device_sampling_config": OnDeviceSamplingConfig(do_sample=False), "output_logits": True} if ods else {}
    neuron_config = app_class.get_neuron_config_cls()(
        on_cpu=True, tp_degree=1, batch_size=2, seq_len=64, torch_dtype=torch.bfloat16, **extra)
    config = app_class.get_config_cls()(neuron_config, load_config=base.load_pretrained_config(model_dir))
    instance = DecoderModelInstance(app_class._model_cls, config)
    instance.load_module()
    module, aliases = instance.get(None)
    states = list(module.past_key_values)
    offsets = [aliases[t] - i for i, t in enumerate(states)]
    param_dtypes = sorted({str(p.dtype) for n, p in module.named_parameters() if not n.startswith("past_key_values.")})
    state_dtypes = [f"{kind}:{str(t.dtype).split('.')[-1]}" for kind, t in zip(module.state_kinds, states)]

    sd = app_class.get_state_dict(model_dir, config)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("scale") else v) for k, v in sd.items()}
    missing = [k for k in module.load_state_dict(sd, strict=False).missing_keys if not k.startswith("past_key_values.")]

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    first = 2 if ods else 1

    def step(ids, mask, pos):
        with torch.no_grad():
            out = module(ids, mask, pos, torch.tensor([1], dtype=torch.int32), torch.ones(1, 3))
        for t in states:  # input_output_aliases: output aliases[t] becomes state t
            t.data = out[aliases[t]]
        logits = out[1] if ods else out[0]
        return logits.reshape(-1, logits.shape[-1])[-1].float(), (out[0].reshape(-1)[-1].item() if ods else None)

    seq = prompt(11, seed=3)
    n = len(seq)
    got, token = step(torch.tensor([seq], dtype=torch.int32), torch.ones(1, n, dtype=torch.int32),
                      torch.arange(n, dtype=torch.int32)[None])
    port_err, hf_err, sampled_is_argmax = [], [], True
    for i in range(5):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1]
            low = hf_bf16(torch.tensor([seq])).logits[0, -1].float()
        port_err.append((got - ref).abs().max().item())
        hf_err.append((low - ref).abs().max().item())
        if ods:
            sampled_is_argmax &= int(token) == int(got.argmax())
        seq.append(int(ref.argmax()))
        if i < 4:
            pos = len(seq) - 1
            got, token = step(torch.tensor([[seq[-1]]], dtype=torch.int32),
                              torch.ones(1, pos + 1, dtype=torch.int32), torch.tensor([[pos]], dtype=torch.int32))
    print(json.dumps({"family": family, "ods": ods, "alias_offsets": sorted(set(offsets)), "first_state_output": first,
                      "state_dtypes": sorted(set(state_dtypes)), "param_dtypes": param_dtypes, "missing": missing,
                      "max_logit_diff": max(port_err), "hf_bf16_max_logit_diff": max(hf_err),
                      "sampled_is_argmax": sampled_is_argmax}))


if __name__ == "__main__":
    main()
