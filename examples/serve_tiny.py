"""The main job: build a tiny Granite 4.0-H model, serve it with `vllm serve`, chat with it.

    python examples/serve_tiny.py [--family granite|qwen3_5|gemma4] [--keep DIR]

Builds the family's tiny random-weight checkpoint (offline), starts `vllm serve` on
127.0.0.1 with the plugin loaded, sends one chat request through the `openai` client,
prints the answer (random weights: expect gibberish, but the plumbing is real), and
stops the server.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

from openai import OpenAI

from vllm_hybrid_neuron.tools.server import VllmServer
from vllm_hybrid_neuron.tools.tiny import FAMILIES, build

# Each family in a dtype a CPU user would pick for it. The plugin serves all three in fp32 and
# bf16 (vLLM's own CPU Gated DeltaNet asserts bf16; the plugin's GDN ops take both).
DTYPE = {"granite": "float32", "qwen3_5": "bfloat16", "gemma4": "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="granite", choices=FAMILIES)
    parser.add_argument("--keep", help="build the checkpoint here and keep it")
    args = parser.parse_args()

    model_dir = args.keep or tempfile.mkdtemp(prefix=f"tiny-{args.family}-")
    build(args.family, model_dir)
    print(f"built tiny {args.family} checkpoint in {model_dir}")

    served_name = f"tiny-{args.family}"
    server_args = ["--served-model-name", served_name, "--dtype", DTYPE[args.family],
                   "--max-model-len", "1024", "--enforce-eager"]
    with VllmServer(model_dir, server_args) as server:
        banner = re.search(r"vllm-hybrid-neuron .*", server.log())
        print(f"vllm serve ready at {server.base_url} in {server.startup_s:.1f}s")
        print(f"plugin: {banner.group(0) if banner else 'NOT LOADED'}")
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        t0 = time.perf_counter()
        reply = client.chat.completions.create(
            model=served_name,
            messages=[{"role": "user", "content": "Tell me about hybrid models."}],
            max_tokens=32, temperature=0.0)
        print(f"answer ({reply.usage.completion_tokens} tokens, "
              f"{time.perf_counter() - t0:.2f}s): {reply.choices[0].message.content!r}")
    print("server stopped")


if __name__ == "__main__":
    main()
