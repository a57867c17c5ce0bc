"""The port the engine drives: one model context that decodes batches of sequences."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.inference.core.types import BatchEntry, SamplingParams, TokenLogprob


class Backend(Protocol):
    """A model context with ``n_seq_max`` sequences sharing ``n_ctx`` KV cells.

    Every method except ``tokenize``, ``detokenize``, ``token_piece``,
    ``is_eog`` and ``check_sampling`` is called from the engine thread only.
    """

    model_name: str
    device: str
    n_gpu_layers: int
    n_ctx: int
    n_seq_max: int
    max_batch_tokens: int

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def token_piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def vocab_size(self) -> int: ...

    def check_sampling(self, params: SamplingParams) -> None:
        """Raise InvalidArgument (field ``sampling.grammar``) when params cannot be used."""

    def open_sampler(self, key: int, params: SamplingParams) -> None: ...

    def close_sampler(self, key: int) -> None: ...

    def decode(self, entries: Sequence[BatchEntry]) -> dict[int, int]:
        """Decode all entries in one call; return sampler_key -> sampled token."""

    def take_logprobs(self) -> dict[int, TokenLogprob]:
        """Log-probabilities of the last decode's sampled tokens (and their params.top_logprobs likeliest
        alternatives), for samplers opened with logprobs."""

    def seq_truncate(self, seq_id: int, keep: int) -> None:
        """Drop every cell of ``seq_id`` at position >= keep (keep=0 clears it)."""

    def seq_copy(self, src_seq_id: int, seq_id: int, upto: int) -> None:
        """Give ``seq_id`` (empty) the cells of ``src_seq_id`` at positions < upto, shared, not duplicated."""

    def seq_save(self, seq_id: int) -> bytes: ...

    def seq_restore(self, seq_id: int, state: bytes) -> bool: ...

    def close(self) -> None: ...
