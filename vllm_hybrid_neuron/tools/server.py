"""Start and stop a local ``vllm serve`` process (127.0.0.1, a free port).

Used by the example, the served tests and the end-to-end benchmarks, so that each
waits for readiness, keeps the server log, and never leaves a server behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` CLI of the running interpreter's environment."""
    beside = Path(sys.executable).with_name("vllm")
    return str(beside) if beside.exists() else (shutil.which("vllm") or "vllm")


class VllmServer:
    """``with VllmServer(model_dir, ["--dtype", "float32"]) as server: server.base_url``"""

    def __init__(self, model: str, args: list[str] | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 300.0):
        self.model = model
        self.args = list(args or [])
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(
            "w+", prefix="vllm-serve-", suffix=".log", delete=False)
        self._proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> "VllmServer":
        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        started = time.perf_counter()
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + self.ready_timeout
        while time.perf_counter() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self._proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            if self.healthy():
                self.startup_s = time.perf_counter() - started
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not ready in {self.ready_timeout:.0f}s:\n"
                           f"{self.log()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGINT)  # the whole group: API server + engine
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
