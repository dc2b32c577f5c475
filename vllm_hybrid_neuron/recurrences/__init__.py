"""Where each recurrence's maths lives: plain torch, one reference per recurrence.

Every other implementation is checked against (or built from) these functions:

- ``gated_delta_rule``: the gated delta rule of Gated DeltaNet (Qwen3-Next / Qwen3.5 linear
  attention). ``gated_delta_rule_step`` / ``gated_delta_rule`` is the token-by-token
  recurrence (the reference); ``chunk_gated_delta_rule`` the chunked WY / UT form of the same
  result, with ``unit_lower_inverse`` for the triangular inverse.
  State layout ``state_kv``: (..., H, Dk, Dv), o_t = S_t^T q_t.
- ``ssd``: the Mamba2 SSM (state-space duality). ``ssd_step`` is the recurrence (the reference),
  ``ssd_chunked`` the chunked scan (with ``segsum``).
  State layout ``state_pn``: (..., H, P, N) (head dim P, state size N), y_t = h_t C_t.
- ``conv``: the depthwise causal conv in front of both mixers, as shift-and-sum
  (``causal_conv``), and the conv state it leaves (``next_conv_state``).

Who uses them:
- ``ops/gated_delta_rule.py``, ``ops/ssd.py``, ``ops/selective_state_update.py``: their ``*_ref``
  functions (the references the C++ kernels are tested against) wrap these with vLLM's slot /
  varlen / speculative / null-block bookkeeping and the cache layouts' transposes (vLLM's GDN
  state rows are (HV, V, K), the transpose of ``state_kv``; its SSM rows are ``state_pn``).
- ``neuron/granite.py`` (Mamba2) and ``neuron/qwen3_5_moe.py`` (GDN): prefill runs the chunked
  forms, decode one recurrence step; both use the conv helpers.
- ``tests/recurrences``: chunked == recurrent, and the recurrences against float64 loops.

Everything here must stay compilable by neuronx-cc: no ``torch.linalg`` solvers or inverses
(XLA TriangularSolve is rejected), no ``conv1d``; matmul, einsum, cumsum, masks, cat, gather.
Nothing here imports vLLM or NxDI.
"""

from vllm_hybrid_neuron.recurrences.conv import causal_conv, next_conv_state
from vllm_hybrid_neuron.recurrences.gated_delta_rule import (
    chunk_gated_delta_rule, gated_delta_rule, gated_delta_rule_step, unit_lower_inverse,
)
from vllm_hybrid_neuron.recurrences.ssd import segsum, ssd_chunked, ssd_step

__all__ = ["causal_conv", "chunk_gated_delta_rule", "gated_delta_rule", "gated_delta_rule_step",
           "next_conv_state", "segsum", "ssd_chunked", "ssd_step", "unit_lower_inverse"]
