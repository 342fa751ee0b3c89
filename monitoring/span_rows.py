"""Fixed-width row templates: many spans of one request shape encoded with numpy at once.

The tracer's shipper turns request records into text (JSON lines) or bytes (OTLP). For one
request shape (method, model, status, which child spans...) everything but the ids, the
times and the request id is the same from one request to the next, and each of those
values has a fixed width: an id is 32 or 16 hex digits (JSON) or 16 or 8 bytes (OTLP), a
time 19 decimal digits (Unix nanoseconds from 2001 to 2286) or 8 bytes, a request id as
long as the group's (the tracer groups by its length). So a shape compiles to a `RowLayout`
(the constant bytes of one row, with holes at fixed offsets), and a group of `n` requests
is one `(n, row)` array: the template copied, then each hole filled for all rows with one
numpy assignment. Per request this costs a fraction of a `%` format or a `struct` pack
(BENCHMARKS.md, "Monitoring overhead").
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Final, NamedTuple

import numpy as np

#: The smallest and the first too large Unix time in ns with `TIME_DIGITS` digits.
TIME_DIGITS: Final = 19
EPOCH_NS_RANGE: Final = (10**18, 10**19)

_FOUR_DIGITS: Final = np.frombuffer(b"".join(b"%04d" % i for i in range(10_000)), np.uint32)
"""0..9999 -> its four decimal digits (ASCII), as one uint32."""
_TEN_THOUSAND: Final = np.uint64(10_000)
_HUNDRED_MILLION: Final = np.uint64(10**8)
_SHARED_WINDOW: Final = 10**10
"""Unix times in ns within one such window (10 s) share their first 9 of 19 digits."""
_PLACEHOLDER: Final = re.compile(r"%(%|s|016x|d)")
_TO_BYTES: Final[Any] = int.to_bytes
#: Rows `RowLayout.fill` fills at a time: a packed chunk in one go. (Blocks of 256 rows, in
#: a core's L2, paid off while each chunk's rows were fresh memory; in a `RowBuffer`, and
#: with a hole copied as one item a row, fewer and longer copies cost less: BENCHMARKS.md,
#: "Eighth session".)
FILL_BLOCK: Final = 1024


class RowLayout(NamedTuple):
    """One row's constant bytes and the (offset, width) of each hole, in order."""

    template: np.ndarray
    """uint8, the row with zeros in the holes."""
    holes: tuple[tuple[int, int], ...]

    def fill(
        self,
        values: Sequence[np.ndarray],
        block: int = FILL_BLOCK,
        buffer: RowBuffer | None = None,
    ) -> np.ndarray:
        """The `(n, row)` rows, one per row of the `values` (one `(n, width)` uint8 array
        per hole, in order); a bytes-like object (`bytes.join` and files take it as is).
        In memory taken from `buffer` if given (see `RowBuffer`), else new.

        Filled `block` rows at a time: each hole's assignment walks the rows again, and a
        block of rows may stay in the CPU's cache between them. A hole's `width` bytes of
        a row are copied as one item (numpy's strided copy of `V<width>` items), not as a
        run of `width` bytes set up per row."""
        n = len(values[0])
        width = len(self.template)
        rows = np.empty((n, width), np.uint8) if buffer is None else buffer.take(n, width)
        for start in range(0, n, block):
            part = rows[start : start + block]
            part[:] = self.template
            for (offset, width), value in zip(self.holes, values, strict=True):
                hole, piece = part[:, offset : offset + width], value[start : start + block]
                if width and piece.strides[1] == 1:
                    hole.view(f"V{width}")[...] = piece.view(f"V{width}")
                else:
                    hole[...] = piece
        return rows


class RowBuffer:
    """Memory that `RowLayout.fill` reuses from one shipment to the next.

    A chunk's rows are a megabyte or so, and glibc serves an allocation that large with a
    fresh `mmap` whenever it is at least as large as the last one freed: every page of
    every chunk can then be a page fault in the kernel (in a backlog's flush ~0.3 a
    request, about a third of the shipper's CPU time; BENCHMARKS.md, "Eighth session";
    a server shipping every 200 ms hit this less often). `take` hands out consecutive
    regions of one array, `reset` starts over at its beginning; a region too large for
    what is left gets a new, larger array (regions already handed out keep the old one
    alive), so the array settles at what one chunk needs.
    """

    def __init__(self) -> None:
        self._array = np.empty(0, np.uint8)
        self._used = 0

    @property
    def capacity(self) -> int:
        """Bytes of the current array."""
        return len(self._array)

    def take(self, n: int, width: int) -> np.ndarray:
        """An uninitialised `(n, width)` uint8 array that no region taken since the last
        `reset` overlaps."""
        size = n * width
        if self._used + size > len(self._array):
            # Large enough for all taken since the reset: the next time round, one array.
            self._array = np.empty(max(2 * len(self._array), self._used + size), np.uint8)
            self._used = 0
        region = self._array[self._used : self._used + size].reshape(n, width)
        self._used += size
        return region

    def reset(self) -> None:
        """Hand the memory out again from the start. The caller must be done with every
        region taken before (they will be overwritten)."""
        self._used = 0


def percent_layout(template: str, widths: Sequence[int], end: bytes = b"") -> RowLayout:
    """The layout of a `%` template whose conversions (`%s`, `%016x`, `%d`) are holes of
    the given widths, in order; `%%` is a constant `%`; `end` follows the row (e.g. a
    newline). The template's text is encoded as UTF-8."""
    pieces: list[bytes] = []
    holes: list[tuple[int, int]] = []
    offset = position = 0
    widths_left = iter(widths)
    for match in _PLACEHOLDER.finditer(template):
        constant = template[position : match.start()].encode()
        pieces.append(constant)
        offset += len(constant)
        position = match.end()
        if match.group(1) == "%":
            pieces.append(b"%")
            offset += 1
            continue
        width = next(widths_left, None)
        if width is None:
            raise ValueError("fewer widths than conversions in the template")
        pieces.append(bytes(width))
        holes.append((offset, width))
        offset += width
    if next(widths_left, None) is not None:
        raise ValueError("more widths than conversions in the template")
    pieces.append(template[position:].encode() + end)
    return RowLayout(np.frombuffer(b"".join(pieces), np.uint8).copy(), tuple(holes))


def struct_layout(constants: Sequence[bytes], codes: Sequence[str]) -> RowLayout:
    """The layout of a little-endian `struct` format that alternates constant byte
    strings with value codes: `constants[0] codes[0] constants[1] ... constants[-1]`."""
    if len(constants) != len(codes) + 1:
        raise ValueError("constants must surround the codes")
    pieces: list[bytes] = []
    holes: list[tuple[int, int]] = []
    offset = 0
    for constant, code in zip(constants, codes, strict=False):
        width = struct.calcsize("<" + code)
        pieces += (constant, bytes(width))
        holes.append((offset + len(constant), width))
        offset += len(constant) + width
    pieces.append(constants[-1])
    return RowLayout(np.frombuffer(b"".join(pieces), np.uint8).copy(), tuple(holes))


def int_bytes(values: Sequence[int], width: int) -> np.ndarray:
    """Non-negative ints (any size: 128-bit trace ids too) as `(n, width)` big-endian
    bytes."""
    # NOTE: `map` over the unbound method: no Python-level call per value.
    raw = b"".join(map(_TO_BYTES, values, repeat(width), repeat("big")))
    return np.frombuffer(raw, np.uint8).reshape(len(values), width)


def be64(values: np.ndarray) -> np.ndarray:
    """uint64 values as `(n, 8)` big-endian bytes."""
    return values.astype(">u8").view(np.uint8).reshape(len(values), 8)


def le64(values: np.ndarray) -> np.ndarray:
    """uint64 values as `(n, 8)` little-endian bytes (protobuf fixed64)."""
    return values.astype("<u8").view(np.uint8).reshape(len(values), 8)


def hex_digits(raw: np.ndarray) -> np.ndarray:
    """`(n, w)` bytes as `(n, 2w)` lowercase hex digits (ASCII), most significant first.

    Arithmetic on one uint16 per byte (its high nibble in the low byte: little-endian
    memory order), no table lookup: a gather costs tens of instructions an item, these
    few vectorised passes a fraction of one."""
    wide = raw.astype("<u2")
    nibbles = (wide >> 4) | ((wide & 15) << 8)
    # A nibble above 9 carries into bit 4 when 6 is added: those digits are 'a'-'f',
    # 39 further on from '0' + nibble.
    letters = ((nibbles + 0x0606) >> 4) & 0x0101
    nibbles += 0x3030 + letters * 39
    return nibbles.view(np.uint8).reshape(len(raw), 2 * raw.shape[1])


def time_digits(values: np.ndarray) -> np.ndarray:
    """uint64 values within `EPOCH_NS_RANGE` as `(n, TIME_DIGITS)` decimal digits (ASCII).

    Five groups of four digits (uint64 division is slow: 4 of them, not 19), each looked
    up; the first of the 20 digits is the leading zero, dropped. Times within one 10 s
    window (a shipment's, but every 50th) share their first 9 digits: then one uint64
    division, not four."""
    if len(values):
        prefix = int(values.min()) // _SHARED_WINDOW
        if int(values.max()) // _SHARED_WINDOW == prefix:
            return _time_digits_after(values, prefix)
    groups = np.empty((len(values), 5), np.uint32)
    rest = values
    for i in range(4, 0, -1):
        rest, groups[:, i] = np.divmod(rest, _TEN_THOUSAND)
    groups[:, 0] = rest
    digits: np.ndarray = _FOUR_DIGITS[groups].view(np.uint8).reshape(len(values), 20)
    return digits[:, 1:]


def _time_digits_after(values: np.ndarray, prefix: int) -> np.ndarray:
    """`time_digits` of values whose first 9 digits are `prefix` (`// _SHARED_WINDOW`): of
    the five groups of four, the first two are the prefix's, the third ends with the
    rest's first two digits (one uint64 division), the last two split the rest's other
    eight (uint32)."""
    n = len(values)
    low = values - np.uint64(prefix * _SHARED_WINDOW)  # < 10**10
    top, rest = np.divmod(low, _HUNDRED_MILLION)
    head, middle = divmod(prefix, 100)  # 7 digits, then the 2 that share a group
    groups = np.empty((n, 5), np.uint32)
    groups[:, 0], groups[:, 1] = divmod(head, 10_000)
    groups[:, 2] = top
    groups[:, 2] += middle * 100
    groups[:, 3], groups[:, 4] = np.divmod(rest.astype(np.uint32), np.uint32(10_000))
    digits: np.ndarray = _FOUR_DIGITS[groups].view(np.uint8).reshape(n, 20)
    return digits[:, 1:]


def text_bytes(texts: Sequence[str], width: int) -> np.ndarray:
    """Strings whose UTF-8 is `width` bytes each, as `(n, width)` bytes."""
    raw = "".join(texts).encode()
    return np.frombuffer(raw, np.uint8).reshape(len(texts), width)
