"""llama.cpp once: process set-up, model loading, contexts, the vocabulary and batch rows.

Everything in the mesh that runs the model goes through here (the node's
``LlamaBackend``, its ``LlamaEmbedder`` and, through ``LocalModel``, an
in-process model), so the load parameters, context parameters and
tokenization are the same wherever the model runs.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as ll

log = logging.getLogger("llmesh.inference.llama")

_backend_ready = threading.Lock()
_backend_initialised = False


@ll.llama_log_callback
def _forward_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor at load time; keep warnings and errors only.
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        log.log(logging.WARNING if level == 3 else logging.ERROR, "%s", text.decode(errors="replace").rstrip())


def init_backend_once() -> None:
    """llama.cpp's process-wide set-up, with its log forwarded to ours."""
    global _backend_initialised
    with _backend_ready:
        if not _backend_initialised:
            ll.llama_log_set(_forward_log, ctypes.c_void_p(0))
            ll.llama_backend_init()
            _backend_initialised = True


def thread_count(n_threads: int) -> int:
    """``n_threads``, or every core when 0: llama.cpp's own default of 4 oversubscribes small machines."""
    return n_threads if n_threads > 0 else max(1, os.cpu_count() or 1)


# CPU flags of the AMX tile unit, whose kernels llama.cpp picks as an extra weight buffer when the build has them.
_AMX_FLAGS = ("amx_tile", "amx_int8")
EXTRA_BUFFER_CHOICES = ("auto", "on", "off")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def use_extra_buffers(choice: str, flags: set[str] | None = None) -> bool:
    """Whether weights may go to llama.cpp's extra CPU buffer types (repacked and AMX layouts).

    "auto" turns them off on a CPU that advertises AMX: a native build then
    multiplies with AMX tiles, and a virtual machine that shows AMX without
    handling its tile state kills the process with SIGILL on the first
    prompt of more than a few tokens (seen on Firecracker guests). Elsewhere
    the repacked layouts stay on; "on" and "off" force the choice.
    """
    if choice not in EXTRA_BUFFER_CHOICES:
        raise ValueError(f"cpu_extra_buffers: one of {', '.join(EXTRA_BUFFER_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return not any(flag in (cpu_flags() if flags is None else flags) for flag in _AMX_FLAGS)


def load_model(model_path: str | Path, *, n_gpu_layers: int = 0, device_index: int = -1,
               extra_buffers: str = "auto") -> ll.llama_model_p:
    """The GGUF's weights, offloading ``n_gpu_layers`` (all on ``device_index`` when >= 0)."""
    init_backend_once()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = use_extra_buffers(extra_buffers)
    if device_index >= 0:
        # One engine per device: keep the whole model on this one.
        params.split_mode = ll.LLAMA_SPLIT_MODE_NONE
        params.main_gpu = device_index
    model = ll.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise RuntimeError(f"cannot load model {model_path}")
    return model


def create_context(model: ll.llama_model_p, *, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int = 0,
                   embeddings: bool = False, what: str = "context") -> ll.llama_context_p:
    """A context over ``model``: ``n_seq_max`` sequences in one unified cache of ``n_ctx`` cells.

    Gemma 3's sliding-window layers keep a full-size cache (``swa_full``), which
    is what lets any prefix of a sequence be kept and extended later. An
    embedding context pools the hidden state of each sequence's last token.
    """
    params = ll.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    if embeddings:
        params.embeddings = True
        params.pooling_type = ll.LLAMA_POOLING_TYPE_LAST
    else:
        params.swa_full = True
        params.kv_unified = True
    threads = thread_count(n_threads)
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"cannot create the llama.cpp {what}")
    return ctx


def put_tokens(batch: ll.llama_batch, row: int, tokens: Sequence[int], start_pos: int, seq_id: int,
               logits_last: bool) -> int:
    """Write ``tokens`` of one sequence into ``batch`` from ``row``; the next free row.

    Only the last token asks for logits, and only when ``logits_last``.
    """
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        batch.token[row] = token
        # llama_cpp annotates pos (llama_pos*, one per token) as an array of arrays.
        batch.pos[row] = start_pos + i  # type: ignore[call-overload]
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = seq_id
        batch.logits[row] = logits_last and i == last
        row += 1
    return row


class LlamaVocab:
    """A model's tokenizer: text <-> token ids, pieces remembered once looked up."""

    def __init__(self, model: ll.llama_model_p) -> None:
        self.handle = ll.llama_model_get_vocab(model)
        self.n_tokens = ll.llama_vocab_n_tokens(self.handle)
        self.bos = ll.llama_vocab_bos(self.handle)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(self.handle, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # the buffer was short; -n is the size needed
            capacity = -n
            buf = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self.handle, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def token_piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self.handle, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.handle, token, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.handle, token))
