"""Top-2 logit gaps of a tiny test model at several final-norm gains (tests/README.md's table).

    python tests/tools/top2_gaps.py FAMILY GAIN [GAIN ...]

For each gain: build the family's tiny model with that gain, let transformers fp32 continue each
of ``helpers.prompt_ids`` greedily for 32 tokens, and report quantiles of (top-1 - top-2 logit)
over every position of prompt + continuation, and the share of positions under 0.25.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import prompt_ids  # noqa: E402


@torch.no_grad()
def gaps(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompt_ids(model_dir):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
        top = model(ids).logits[0].topk(2, -1).values  # (seq, 2)
        out.append(top[:, 0] - top[:, 1])
    return torch.cat(out)


def main() -> None:
    from vllm_hybrid_neuron.tools.tiny import build

    family, gains = sys.argv[1], [float(g) for g in sys.argv[2:]]
    for gain in gains:
        with tempfile.TemporaryDirectory() as tmp:
            g = gaps(str(build(family, tmp, logit_gain=gain)))
        q = torch.quantile(g, torch.tensor([0.01, 0.1, 0.5]))
        print(f"| {family} | {gain:g} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | "
              f"{(g < 0.25).float().mean():.2f} |")


if __name__ == "__main__":
    main()
