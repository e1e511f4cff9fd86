"""Shared fixtures. Redis: `SPECRELAY_TEST_REDIS` if set, else a private redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest
import torch

# Tiny models on a small shared CPU: one intra-op thread is several times faster than two fighting for cores.
torch.set_num_threads(1)

# Hermetic: servers the tests start (and their children) neither read nor write the user's PTE profile cache.
os.environ["SPECRELAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="specrelay-test-cache-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server for the session. A private server is ours to flush; a shared one is only written under
    the per-test `redis_prefix`."""
    url = os.environ.get("SPECRELAY_TEST_REDIS")
    if url:
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs it) or set SPECRELAY_TEST_REDIS")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"redis-server did not start on port {port}")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_prefix() -> str:
    """A key/stream prefix private to one test, so tests never touch each other's (or anyone's) keys."""
    return f"specrelay-test:{uuid.uuid4().hex[:12]}:"


def save_tiny_llama(path, seed: int, vocab_size: int = 101, **overrides):
    """A random-initialised tiny Llama saved by transformers into `path` (a local HF directory)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    initializer_range=0.2, eos_token_id=None)
    settings.update(overrides)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(LlamaConfig(**settings)).save_pretrained(path)
    return path
