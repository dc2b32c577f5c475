"""AWS Neuron backend: NxDI model ports, imported lazily (never on CPU)."""
