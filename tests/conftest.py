"""Shared fixtures. Every test runs offline: sockets to anything but loopback are refused and the HF hub is off."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise OSError(f"network access blocked in tests: {address!r}")


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """A test that reaches the network fails: the engine must never download anything."""
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tiny checkpoints and hash caches go to a per-session folder, never the user's cache."""
    os.environ["CASCADE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cascade-cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def tiny_models():
    from cascade.tiny import build_tiny_models

    return build_tiny_models(seed=0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_models):
    """The ComfyUI all-in-one tiny Stage C and Stage B files (fp16, as SoteDiffusion ships)."""
    from cascade import tiny

    folder = tmp_path_factory.mktemp("tiny-comfy")
    prior = tiny.write_comfyui_stage_c(folder / "tiny_sote_main.safetensors", tiny_models)
    decoder = tiny.write_comfyui_stage_b(folder / "tiny_sote_decoder.safetensors", tiny_models)
    return prior, decoder


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pair):
    """A loaded tiny pipeline on the CPU in fp32, shared by the end-to-end tests."""
    from cascade_backends import select_backend
    from cascade.engine import load_pipeline

    pipe, _ = load_pipeline(*tiny_pair, backend=select_backend("cpu"), dtype=torch.float32)
    return pipe


@pytest.fixture
def nan_when_bf16():
    """A forward hook that turns a module's output into NaN while its weights are bf16 (drives the NaN guard)."""

    def hook(module, args, output):
        if next(module.parameters()).dtype == torch.bfloat16:
            return (torch.full_like(output[0], float("nan")),)
        return output

    return hook
