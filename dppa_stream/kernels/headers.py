"""A scanner for safetensors headers as safetensors writes them, compiled by numba.

An MoE checkpoint's shard headers hold tens of thousands of entries; `json.loads` makes a dict,
two lists and their numbers for each one, which was most of opening a 45k-tensor checkpoint. The
header of a file written by safetensors has one exact form (no whitespace but the trailing
padding, keys in the order dtype, shape, data_offsets, integers without signs or leading zeros):

    {"__metadata__":{"format":"pt"},"NAME":{"dtype":"BF16","shape":[64,32],"data_offsets":[0,4096]},...}

`scan_header` checks that form byte by byte (names printable ASCII without a backslash, so no
escapes) and reads each entry's data_offsets; the caller splits the text at its quotes for the
names, dtypes and shapes. Anything else (escapes, non-ASCII names, other spacing or key order,
other metadata) is not that form and goes the JSON way (`checkpoint.format`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

QUOTE, COLON, COMMA, OPEN, CLOSE, LBRACKET, RBRACKET, BACKSLASH, SPACE = 34, 58, 44, 123, 125, 91, 93, 92, 32
MAX_DIGITS = 18  # an integer of up to 18 digits fits int64; longer ones go the JSON way

# the literal text between an entry's fields
AFTER_NAME = np.frombuffer(b':{"dtype":"', np.uint8)
AFTER_DTYPE = np.frombuffer(b'","shape":[', np.uint8)
AFTER_SHAPE = np.frombuffer(b'"data_offsets":[', np.uint8)


@njit(inline="always")
def _literal(b, p, end, lit):
    """p past `lit` if b[p:] starts with it, else -1."""
    if p < 0 or p + lit.shape[0] > end:
        return -1
    for i in range(lit.shape[0]):
        if b[p + i] != lit[i]:
            return -1
    return p + lit.shape[0]


@njit(inline="always")
def _integer(b, p, end):
    """p past a JSON integer of at most MAX_DIGITS digits without sign or leading zero, else -1."""
    s = p
    while p < end and 48 <= b[p] <= 57:
        p += 1
    n = p - s
    if n == 0 or n > MAX_DIGITS or (n > 1 and b[s] == 48):
        return -1
    return p


@njit(inline="always")
def _value(b, s, e):
    v = np.int64(0)
    for i in range(s, e):
        v = v * 10 + (b[i] - 48)
    return v


@njit(nogil=True, cache=True)
def scan_header(b, start, offsets):
    """Entries of header bytes `b` in safetensors' own form, from byte `start` (just past the
    opening brace and any metadata): offsets[k] = entry k's data_offsets. Returns the entry count,
    or -1 when the header is not in that form (or has more entries than `offsets` has rows). Names
    must be printable ASCII without a backslash; trailing spaces (safetensors' padding) are allowed."""
    end = b.shape[0]
    while end > 0 and b[end - 1] == SPACE:
        end -= 1
    if end < 2 or b[0] != OPEN or b[end - 1] != CLOSE:
        return -1
    end -= 1  # the closing brace
    p = start
    k = 0
    while True:
        if k == offsets.shape[0] or p >= end or b[p] != QUOTE:
            return -1
        p += 1
        while p < end and b[p] != QUOTE:
            if b[p] < SPACE or b[p] > 126 or b[p] == BACKSLASH:
                return -1
            p += 1
        p = _literal(b, p + 1, end, AFTER_NAME)
        if p < 0:
            return -1
        s = p
        while p < end and (65 <= b[p] <= 90 or 97 <= b[p] <= 122 or 48 <= b[p] <= 57 or b[p] == 95):
            p += 1
        if p == s:
            return -1
        p = _literal(b, p, end, AFTER_DTYPE)
        if p < 0:
            return -1
        if p < end and b[p] != RBRACKET:
            while True:
                p = _integer(b, p, end)
                if p < 0 or p >= end:
                    return -1
                if b[p] == RBRACKET:
                    break
                if b[p] != COMMA:
                    return -1
                p += 1
        if p + 2 > end or b[p + 1] != COMMA:
            return -1
        p = _literal(b, p + 2, end, AFTER_SHAPE)
        if p < 0:
            return -1
        q = _integer(b, p, end)
        if q < 0 or q >= end or b[q] != COMMA:
            return -1
        offsets[k, 0] = _value(b, p, q)
        p = q + 1
        q = _integer(b, p, end)
        if q < 0 or q + 2 > end or b[q] != RBRACKET or b[q + 1] != CLOSE:
            return -1
        offsets[k, 1] = _value(b, p, q)
        p = q + 2
        k += 1
        if p == end:
            return k
        if b[p] != COMMA:
            return -1
        p += 1
