"""Registration of the NxDI ports with vllm-neuron (filled in by the Neuron backend)."""


def register_neuron_models() -> None:
    raise NotImplementedError(
        "VLLM_HYBRID_NEURON_BACKEND=neuron: the Neuron model ports are not built yet"
    )
