"""A list body held as its entries' JSON, joined only slice by slice as it is sent.

Why: at 8,000 devices the device list is ~12 MB joined from 8,000 ready-made JSON values.
Joining it whole on a request (twice: the list, then head and tail around it) took 10 ms on an
idle machine and 50 ms and more during the soak, on the event loop, before the first byte went
out; every request paid it, since the fleet changes between any two requests. A ``Joined`` is
the same body as a snapshot of references (a list of 8,000 pointers and a length, well under a
millisecond): the response joins one slice of about ``LARGE_BODY`` at a time while the client
reads the previous one. The entries are immutable bytes, so the snapshot stays exactly the body
of the moment it was taken, whatever the watch applies while it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SEPARATOR = b","


@dataclass(frozen=True, slots=True)
class Joined:
    """``head + b",".join(parts) + tail``, not yet joined."""

    head: bytes
    parts: Sequence[bytes]
    tail: bytes
    size: int = field(init=False)

    def __post_init__(self) -> None:
        joined = sum(map(len, self.parts)) + max(0, len(self.parts) - 1) * len(SEPARATOR)
        object.__setattr__(self, "size", len(self.head) + joined + len(self.tail))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join((self.head, SEPARATOR.join(self.parts), self.tail))

    def slices(self, limit: int) -> Iterator[bytes]:
        """The body in order, in pieces of about ``limit`` bytes (one entry may exceed it);
        ``b"".join`` of them is ``bytes(self)``."""
        group: list[bytes] = [self.head]
        held = len(self.head)
        first = True
        for part in self.parts:
            if not first:
                group.append(SEPARATOR)
            first = False
            group.append(part)
            held += len(part) + 1
            if held >= limit:
                yield b"".join(group)
                group, held = [], 0
        group.append(self.tail)
        yield b"".join(group)


Body = bytes | Joined
