"""Run in a subprocess: one port through NxDI on CPU, driven as vllm-neuron drives it.

usage: [torchrun --nproc-per-node TP] python -m tests.neuron.nxdi_cpu.run_slots FAMILY MODEL_DIR
A batch-4 model (continuous batching): three prompts of different lengths prefilled one at a time
into slots 2, 0 and 3, then decode steps over partial, unsorted slot batches ([3, 0], [2], [0, 3, 2],
[3, 2], [0]): NxDI pads each batch with rows for the slots not in it, which must leave those
slots' states alone. Every row's logits are compared with transformers fp32 on that slot's own
sequence (teacher-forced). Prints one JSON line (rank 0). HARNESS_BREAK=no-seq-ids-mask turns off the
ports' seq-id mask, so NxDI's padded rows run a step on the slots they stand for (the check must fail).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    family, model_dir = sys.argv[1], sys.argv[2]
    sys.path[:0] = [os.environ["NXDI_SRC"], os.environ["NXD_SRC"]]
    from tests.neuron.nxdi_cpu import standins

    standins.install()
    import torch
    from transformers import AutoModelForCausalLM

    from tests.neuron.neuron_helpers import app_cls, prompt
    from vllm_hybrid_neuron.neuron import base

    app_class = app_cls(family)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    neuron_config = app_class.get_neuron_config_cls()(
        on_cpu=True, tp_degree=tp, batch_size=4, seq_len=64, torch_dtype=torch.float32,
        is_continuous_batching=True)
    config = app_class.get_config_cls()(neuron_config, load_config=base.load_pretrained_config(model_dir))
    if os.environ.get("HARNESS_BREAK") == "no-seq-ids-mask":  # padded rows keep the real slot ids NxDI gives them
        config.neuron_config.apply_seq_ids_mask = False
    app = app_class(model_dir, config)
    app.to_cpu()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    seqs = {2: prompt(11, seed=3), 0: prompt(5, seed=4), 3: prompt(17, seed=5)}
    max_diff, tokens_equal, rows_checked = 0.0, True, 0

    def check(slot: int, logits: torch.Tensor) -> None:
        nonlocal max_diff, tokens_equal, rows_checked
        with torch.no_grad():
            ref = hf(torch.tensor([seqs[slot]])).logits[0, -1]
        max_diff = max(max_diff, (logits - ref).abs().max().item())
        tokens_equal &= int(logits.argmax()) == int(ref.argmax())
        rows_checked += 1
        seqs[slot].append(int(ref.argmax()))

    for slot in (2, 0, 3):  # one prefill per slot
        ids = seqs[slot]
        out = app.forward(input_ids=torch.tensor([ids], dtype=torch.int32),
                          attention_mask=torch.ones(1, len(ids), dtype=torch.int32),
                          position_ids=torch.arange(len(ids), dtype=torch.int32)[None],
                          seq_ids=torch.tensor([slot], dtype=torch.int32))
        check(slot, out.logits.reshape(-1, out.logits.shape[-1])[-1])
    for batch in ([3, 0], [2], [0, 3, 2], [3, 2], [0]):
        pos = [len(seqs[s]) - 1 for s in batch]
        out = app.forward(input_ids=torch.tensor([[seqs[s][-1]] for s in batch], dtype=torch.int32),
                          attention_mask=torch.ones(len(batch), max(pos) + 1, dtype=torch.int32),
                          position_ids=torch.tensor([[p] for p in pos], dtype=torch.int32),
                          seq_ids=torch.tensor(batch, dtype=torch.int32))
        logits = out.logits.reshape(len(batch), -1, out.logits.shape[-1])[:, -1]
        for row, slot in enumerate(batch):
            check(slot, logits[row])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"family": family, "tp": tp, "rows_checked": rows_checked,
                          "max_logit_diff": max_diff, "tokens_equal": tokens_equal}))


if __name__ == "__main__":
    main()
