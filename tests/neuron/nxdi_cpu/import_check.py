"""Run in a subprocess: bind the ports to the real NxDI classes (stand-ins only for Neuron packages).

Prints one JSON line: the stubbed transformers names and, per port, the NxDI base classes it resolved.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    sys.path[:0] = [os.environ["NXDI_SRC"], os.environ["NXD_SRC"]]
    from tests.neuron.nxdi_cpu import standins

    stubbed = standins.install()
    from neuronx_distributed_inference.models.config import InferenceConfig, NeuronConfig
    from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM, NeuronBaseModel

    neuron_config = NeuronConfig(on_cpu=True, tp_degree=1, batch_size=2, seq_len=64, torch_dtype="float32")
    from vllm_hybrid_neuron.neuron import base, gemma4, granite, qwen3_5_moe

    ports = {}
    for module in (granite, qwen3_5_moe, gemma4):
        classes = [getattr(module, n) for n in dir(module)
                   if isinstance(getattr(module, n), type) and getattr(module, n).__module__ == module.__name__]
        ports[module.__name__.rsplit(".", 1)[-1]] = {
            c.__name__: [b.__module__ + "." + b.__name__ for b in c.__mro__
                         if b.__module__.startswith("neuronx_distributed_inference")]
            for c in classes
            if issubclass(c, (InferenceConfig, NeuronBaseModel, NeuronBaseForCausalLM))}
    print(json.dumps({"has_nxdi": base.HAS_NXDI, "on_cpu": bool(neuron_config.on_cpu),
                      "stubbed_transformers": stubbed, "ports": ports}))


if __name__ == "__main__":
    main()
