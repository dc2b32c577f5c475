"""The plugin's vLLM model classes for the CPU backend, one module per family."""
