"""vllm-neuron 0.2's NeuronPlatform, reduced to the attributes recorded in api_surface.json."""
from vllm.platforms.cpu import CpuPlatform


class NeuronPlatform(CpuPlatform):
    device_name = "cpu"
    device_type = "cpu"
    ray_device_key = "neuron_cores"
    device_control_env_var = "NEURON_RT_VISIBLE_CORES"
