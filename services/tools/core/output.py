"""Byte-capped capture of a stream that keeps its head and its tail."""
from __future__ import annotations

from dataclasses import dataclass

MARKER = "\n…[{omitted} bytes omitted]…\n"


@dataclass(frozen=True)
class CapturedText:
    text: str
    original_bytes: int
    truncated: bool

    @classmethod
    def empty(cls) -> CapturedText:
        return cls("", 0, False)

    @classmethod
    def of(cls, data: bytes | str, cap_bytes: int) -> CapturedText:
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
        buf = HeadTailBuffer(cap_bytes)
        buf.feed(raw)
        return buf.captured()


class HeadTailBuffer:
    """Keeps the first and last ``cap_bytes // 2`` bytes of everything fed.

    The head shows how a command started, the tail how it ended (the error
    usually sits there); the middle of a huge output is what gets dropped.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = max(0, cap_bytes)
        self.head_cap = self.cap_bytes - self.cap_bytes // 2
        self.tail_cap = self.cap_bytes // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.total_bytes += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk or self.tail_cap == 0:
            return
        self.tail += chunk
        if len(self.tail) > self.tail_cap:
            del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.head) + len(self.tail)

    def captured(self) -> CapturedText:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if not self.truncated:
            return CapturedText(head + tail, self.total_bytes, False)
        omitted = self.total_bytes - len(self.head) - len(self.tail)
        return CapturedText(head + MARKER.format(omitted=omitted) + tail, self.total_bytes, True)
