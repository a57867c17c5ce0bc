"""Token ids checked against the vocabulary, prefix matching, incremental UTF-8 decoding and stop strings."""
from __future__ import annotations

import codecs
from collections.abc import Sequence

from services.common.errors import InvalidArgument


def check_token_ids(tokens: Sequence[int], n_vocab: int, field_name: str) -> None:
    """InvalidArgument naming ``field_name`` unless every id is in the model's vocabulary."""
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidArgument(f"{field_name}: token id {bad} is outside the vocabulary of {n_vocab}",
                              field=field_name)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StreamText:
    """Turns token pieces (bytes) into text, holding back what may become a stop string.

    A piece can end inside a multi-byte UTF-8 character, and a stop string can
    span pieces, so text is released only once it can no longer be part of a
    stop string; the stop string itself is never released.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a piece; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out
        cut = min((i for i in (self._held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._partial_stop_suffix(self._held)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        return out

    def flush(self) -> str:
        """The text still held when generation ends without a stop string."""
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
