"""Harness that runs the ports through the real NxDI / neuronx-distributed Python code on CPU.

Only ``standins.install()`` touches the import system; it is called in a subprocess, never in the
pytest process, so the other tests keep seeing an environment without NxDI.
"""
