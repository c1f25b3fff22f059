"""Tiny GGUFs of architectures whose cache cannot be cut in the middle, for the cache tests.

A hybrid (`lfm2`: short-convolution layers with recurrent state, and attention layers) and a
pure recurrent model (`mamba`), with random weights and the bundled SmolLM2's tokenizer and
chat template, so the real daemon serves them over the real API. Their text is noise; what the
tests measure (tokens read from the cache, checkpoints, persistence) does not depend on it.

Built with llama.cpp's own `gguf` writer; `python -m tests.tiny_models DIR` writes both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pensieve.paths import bundled_model_path

N_EMBD = 64
N_FF = 128
N_LAYER = 4
N_HEAD = 4
N_HEAD_KV = 2
CONTEXT = 8192
SEED = 20261202

Tensors = dict[str, np.ndarray[Any, Any]]


def _tokenizer(writer: gguf.GGUFWriter) -> int:
    """Copy the bundled model's tokenizer and chat template; its vocabulary size."""
    source = bundled_model_path()
    if source is None:
        raise RuntimeError("the bundled SmolLM2 model is not installed (make install)")
    reader = gguf.GGUFReader(source)
    vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, field.types[-1])
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
        else:
            writer.add_key_value(name, value, kind)
    return vocab


def _random(rng: np.random.Generator) -> Callable[..., np.ndarray[Any, Any]]:
    def tensor(*shape: int, scale: float = 0.05) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return tensor


def _ones(n: int) -> np.ndarray[Any, Any]:
    return np.ones(n, dtype=np.float32)


Keys = Callable[[gguf.GGUFWriter], None]


def _write(path: Path, arch: str, keys: Keys, tensors: Tensors) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"pensieve-tiny-{arch}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_layer_norm_rms_eps(1e-5)
    keys(writer)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _vocab_size() -> int:
    source = bundled_model_path()
    assert source is not None
    field = gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"]
    return len(field.data)


def hybrid(path: Path) -> Path:
    """LFM2: layers 0, 1 and 3 short convolutions (recurrent state), layer 2 attention."""
    rng = np.random.default_rng(SEED)
    t = _random(rng)
    vocab = _vocab_size()
    head_dim = N_EMBD // N_HEAD
    attention = {2}
    tensors: Tensors = {
        "token_embd.weight": t(vocab, N_EMBD),
        "token_embd_norm.weight": _ones(N_EMBD),
    }
    for i in range(N_LAYER):
        b = f"blk.{i}"
        tensors |= {
            f"{b}.attn_norm.weight": _ones(N_EMBD),
            f"{b}.ffn_norm.weight": _ones(N_EMBD),
            f"{b}.ffn_gate.weight": t(N_FF, N_EMBD),
            f"{b}.ffn_up.weight": t(N_FF, N_EMBD),
            f"{b}.ffn_down.weight": t(N_EMBD, N_FF),
        }
        if i in attention:
            tensors |= {
                f"{b}.attn_q_norm.weight": _ones(head_dim),
                f"{b}.attn_k_norm.weight": _ones(head_dim),
                f"{b}.attn_q.weight": t(N_EMBD, N_EMBD),
                f"{b}.attn_k.weight": t(N_HEAD_KV * head_dim, N_EMBD),
                f"{b}.attn_v.weight": t(N_HEAD_KV * head_dim, N_EMBD),
                f"{b}.attn_output.weight": t(N_EMBD, N_EMBD),
            }
        else:
            tensors |= {
                f"{b}.shortconv.conv.weight": t(N_EMBD, 3),
                f"{b}.shortconv.in_proj.weight": t(3 * N_EMBD, N_EMBD),
                f"{b}.shortconv.out_proj.weight": t(N_EMBD, N_EMBD),
            }

    def keys(writer: gguf.GGUFWriter) -> None:
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv([N_HEAD_KV if i in attention else 0 for i in range(N_LAYER)])
        writer.add_shortconv_l_cache(3)
        writer.add_vocab_size(vocab)
        _tokenizer(writer)

    return _write(path, "lfm2", keys, tensors)


def recurrent(path: Path) -> Path:
    """Mamba (v1): every layer a selective state space, no attention at all."""
    rng = np.random.default_rng(SEED + 1)
    t = _random(rng)
    vocab = _vocab_size()
    d_inner, d_state, d_conv, dt_rank = 2 * N_EMBD, 16, 4, 4
    tensors: Tensors = {
        "token_embd.weight": t(vocab, N_EMBD),
        "output_norm.weight": _ones(N_EMBD),
    }
    for i in range(N_LAYER):
        b = f"blk.{i}"
        tensors |= {
            f"{b}.attn_norm.weight": _ones(N_EMBD),
            f"{b}.ssm_in.weight": t(2 * d_inner, N_EMBD),
            f"{b}.ssm_conv1d.weight": t(d_inner, d_conv),
            f"{b}.ssm_conv1d.bias": t(d_inner),
            f"{b}.ssm_x.weight": t(dt_rank + 2 * d_state, d_inner),
            f"{b}.ssm_dt.weight": t(d_inner, dt_rank),
            f"{b}.ssm_dt.bias": t(d_inner),
            # A is negative (a decaying state), as trained models' -exp(A_log) is.
            f"{b}.ssm_a": -np.abs(t(d_inner, d_state, scale=1.0)) - 0.1,
            f"{b}.ssm_d": _ones(d_inner),
            f"{b}.ssm_out.weight": t(N_EMBD, d_inner),
        }

    def keys(writer: gguf.GGUFWriter) -> None:
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_ssm_conv_kernel(d_conv)
        writer.add_ssm_inner_size(d_inner)
        writer.add_ssm_state_size(d_state)
        writer.add_ssm_time_step_rank(dt_rank)
        writer.add_vocab_size(vocab)
        _tokenizer(writer)

    return _write(path, "mamba", keys, tensors)


def build(directory: Path) -> dict[str, Path]:
    """Both models under `directory` (written once; kept when already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, make in (("hybrid", hybrid), ("recurrent", recurrent)):
        path = directory / f"tiny-{name}.gguf"
        if not path.is_file():
            partial = path.with_suffix(".partial")
            make(partial)
            partial.replace(path)
        built[name] = path
    return built


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1])).items():
        print(name, path)
