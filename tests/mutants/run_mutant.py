"""Run tools.generate with one deliberate code break applied, engine in this process.

    python tests/mutants/run_mutant.py MUTATION REQUEST.json RESULT.json

Test-only: the breaks live here, never in the plugin. VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps
vLLM's engine in this process, so a patch made before the engine starts is the one it runs.
"""

from __future__ import annotations

import os
import sys


def _gemma4_no_v_norm() -> None:
    """Gemma 4's attention without its (scale-free) V norm."""
    import torch
    from vllm.model_executor.models import gemma4

    init = gemma4.Gemma4Attention.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if hasattr(self, "v_norm"):
            self.v_norm = torch.nn.Identity()

    gemma4.Gemma4Attention.__init__ = patched


def _qwen3_5_decay_sign_flipped() -> None:
    """Qwen3.5's GDN log-decay g = +exp(A_log) softplus(a + dt_bias) (sign flipped)."""
    from vllm_hybrid_neuron.cpu.layers import gated_deltanet
    from vllm_hybrid_neuron.ops import gated_delta_rule

    right = gated_delta_rule.sigmoid_gating

    def flipped(*args, **kwargs):
        g, beta = right(*args, **kwargs)
        return -g, beta

    gated_delta_rule.sigmoid_gating = flipped
    gated_deltanet.sigmoid_gating = flipped


def _qwen3_5_decode_dt_bias_dropped() -> None:
    """Qwen3.5's fused GDN decode step (gdn_decode) without dt_bias; prefill stays right."""
    import torch
    from vllm_hybrid_neuron.cpu.layers import gated_deltanet

    right = gated_deltanet.gdn_decode

    def dropped(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias,
                *args, **kwargs):
        return right(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log,
                     torch.zeros_like(dt_bias), *args, **kwargs)

    gated_deltanet.gdn_decode = dropped


MUTATIONS = {"gemma4_no_v_norm": _gemma4_no_v_norm,
             "qwen3_5_decay_sign_flipped": _qwen3_5_decay_sign_flipped,
             "qwen3_5_decode_dt_bias_dropped": _qwen3_5_decode_dt_bias_dropped}

if __name__ == "__main__":
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", "engine must run in-process"
    MUTATIONS[sys.argv[1]]()
    from vllm_hybrid_neuron.tools import generate

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    generate.main()
