"""Per-process counters of plugin-op calls, so tests can prove which ops ran.

Incremented once per layer call (not per token); read in a worker with
``LLM.apply_model(vllm_hybrid_neuron.tools.introspect.plugin_op_counts)``.
"""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter[str] = Counter()


def count(name: str) -> None:
    _COUNTS[name] += 1


def snapshot() -> dict[str, int]:
    return dict(_COUNTS)
