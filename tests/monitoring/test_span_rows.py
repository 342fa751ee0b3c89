"""Fixed-width row templates: each converter and layout against Python's own formatting."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring.span_rows import (
    EPOCH_NS_RANGE,
    RowBuffer,
    be64,
    hex_digits,
    int_bytes,
    le64,
    percent_layout,
    struct_layout,
    text_bytes,
    time_digits,
)

U64 = st.integers(0, (1 << 64) - 1)


@given(st.lists(st.integers(*EPOCH_NS_RANGE).map(lambda v: min(v, EPOCH_NS_RANGE[1] - 1)),
                min_size=1, max_size=20))  # fmt: skip
def test_time_digits_are_the_decimal_text(values: list[int]) -> None:
    digits = time_digits(np.array(values, np.uint64))
    assert [bytes(row).decode() for row in digits] == [str(v) for v in values]


@given(
    st.integers(10**8, 10**9 - 1),
    st.lists(st.integers(0, 10**10 - 1), min_size=1, max_size=20),
)
def test_time_digits_of_times_in_one_10_s_window(prefix: int, lows: list[int]) -> None:
    """Times sharing their first 9 digits (the shortcut) and edge values of the rest."""
    values = [prefix * 10**10 + low for low in [*lows, 0, 10**10 - 1, 99_999_999, 10**8]]
    digits = time_digits(np.array(values, np.uint64))
    assert [bytes(row).decode() for row in digits] == [str(v) for v in values]


@given(st.lists(st.integers(0, (1 << 128) - 1), min_size=1, max_size=20))
def test_ids_as_bytes_and_hex_are_pythons(values: list[int]) -> None:
    raw = int_bytes(values, 16)
    assert [bytes(row) for row in raw] == [v.to_bytes(16, "big") for v in values]
    assert [bytes(row).decode() for row in hex_digits(raw)] == [f"{v:032x}" for v in values]


@given(st.lists(U64, min_size=1, max_size=20))
def test_64_bit_values_in_both_byte_orders(values: list[int]) -> None:
    array = np.array(values, np.uint64)
    assert [bytes(r) for r in be64(array)] == [struct.pack(">Q", v) for v in values]
    assert [bytes(r) for r in le64(array)] == [struct.pack("<Q", v) for v in values]


def test_a_percent_template_fills_as_the_format_does() -> None:
    template = '{"a":"%s","b":%016x,"pct":"100%%","t":%d,"id":%s}'
    layout = percent_layout(template, [4, 16, 19, 7], end=b"\n")
    rows = [("ab12", 0xBEEF, 1_763_900_000_123_456_789, '"ü-12"'),
            ("ffff", 1, 10**18, '"x%d-1"')]  # fmt: skip
    values = [
        text_bytes([r[0] for r in rows], 4),
        hex_digits(int_bytes([r[1] for r in rows], 8)),
        time_digits(np.array([r[2] for r in rows], np.uint64)),
        text_bytes([r[3] for r in rows], 7),
    ]
    assert bytes(layout.fill(values)) == "".join(template % r + "\n" for r in rows).encode()
    # Filled a block of rows at a time: the same bytes whatever the block.
    many = [np.concatenate([v] * 5) for v in values]  # 10 rows
    assert (
        bytes(layout.fill(many, block=3))
        == bytes(layout.fill(many, block=64))
        == ("".join(template % r + "\n" for r in rows).encode() * 5)
    )


def test_a_row_buffer_hands_out_disjoint_regions_and_reuses_them_after_a_reset() -> None:
    """Regions taken between resets never overlap; a region too large for what is left
    gets a new array sized for all taken since the reset (earlier regions keep their
    bytes); after a reset the same memory is handed out again; `fill` into it writes
    what a fresh array would hold."""
    buffer = RowBuffer()
    first = buffer.take(3, 10)
    first[:] = 1
    second = buffer.take(4, 10)  # does not fit: a new array of 70 bytes
    second[:] = 2
    assert buffer.capacity == 70 and not np.shares_memory(first, second)
    assert (first == 1).all() and (second == 2).all()
    buffer.reset()
    again = buffer.take(3, 10)
    more = buffer.take(4, 10)  # fits now: the same array, no growth
    assert buffer.capacity == 70 and np.shares_memory(again, second)
    assert not np.shares_memory(again, more)
    assert again.shape == (3, 10) and more.shape == (4, 10)
    layout = percent_layout("<%s|%s>", [2, 3], end=b"\n")
    values = [text_bytes(["ab", "cd"], 2), text_bytes(["xyz", "uvw"], 3)]
    buffer.reset()
    assert bytes(layout.fill(values, buffer=buffer)) == b"<ab|xyz>\n<cd|uvw>\n"


@given(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=20))
def test_hex_digits_are_bytes_hex(rows: list[bytes]) -> None:
    raw = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), 8)
    assert [bytes(row).decode() for row in hex_digits(raw)] == [r.hex() for r in rows]


def test_hex_digits_of_every_byte_value() -> None:
    raw = np.arange(256, dtype=np.uint8).reshape(32, 8)
    assert b"".join(bytes(row) for row in hex_digits(raw)).decode() == bytes(range(256)).hex()


def test_a_struct_layout_fills_as_struct_packs() -> None:
    constants, codes = [b"\x0a\x10", b"\x12\x08", b"", b"\x7a"], ["16s", "8s", "Q"]
    layout = struct_layout(constants, codes)
    pack = struct.Struct("<2s16s2s8s0sQ1s").pack
    rows = [(b"t" * 16, b"s" * 8, 7), (b"u" * 16, b"v" * 8, 1 << 63)]
    values = [
        np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(2, 16),
        np.frombuffer(b"".join(r[1] for r in rows), np.uint8).reshape(2, 8),
        le64(np.array([r[2] for r in rows], np.uint64)),
    ]
    expected = b"".join(pack(b"\x0a\x10", t, b"\x12\x08", s, b"", q, b"\x7a") for t, s, q in rows)
    assert bytes(layout.fill(values)) == expected


def test_layouts_refuse_mismatched_holes() -> None:
    with pytest.raises(ValueError, match="more widths"):
        percent_layout("%s", [1, 2])
    with pytest.raises(ValueError, match="surround"):
        struct_layout([b""], ["Q"])
