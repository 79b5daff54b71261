"""Compact, self-describing wire/disk format for sparse flat vectors (numpy only).

Layout of ``encode(values, mask)`` (all little-endian)::

    offset  size  field
    0       4     magic b"FSP1"
    4       1     layout: 0 = bitmask, 1 = index list
    5       1     dtype code (see DTYPE_CODES)
    6       2     reserved, must be 0
    8       8     N    (uint64, dense length)
    16      8     nnz  (uint64, kept positions)
    24      ...   bitmask: ceil(N/8) bytes, np.packbits with bitorder="little"
                  (bit i of byte j is position 8*j + i; padding bits are 0)
                  or index list: nnz strictly increasing indices, uint16 when
                  N <= 65536, uint32 when N <= 2**32, else uint64
    ...     ...   values[mask], nnz items of the value dtype

The encoder always picks the smaller of the two layouts (the bitmask on a tie), so each
(values, mask) pair has exactly one encoding; ``decode`` accepts only that encoding and
treats the buffer as untrusted input.
"""

from __future__ import annotations

import struct

import numpy as np
from numpy.typing import DTypeLike

from .checks import bool_vector
from .errors import EncodingError

MAGIC = b"FSP1"
LAYOUT_BITMASK = 0
LAYOUT_INDEX = 1
_HEADER = struct.Struct("<4sBBHQQ")
HEADER_NBYTES = _HEADER.size
# Default cap on N when decode() is not told the expected length (checkpoint.load_model reads a model file
# before it knows the model): a header of 24 bytes could otherwise ask for an arbitrarily large dense output
# (index layout, nnz = 0). Its values may take at most what a float32 vector of MAX_N takes (4 GiB), so that
# a wider dtype code does not multiply it (float64: 8 GiB).
MAX_N = 1 << 30

DTYPE_CODES = {
    np.dtype(np.bool_): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.uint8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.uint16): 4,
    np.dtype(np.int32): 5,
    np.dtype(np.uint32): 6,
    np.dtype(np.int64): 7,
    np.dtype(np.uint64): 8,
    np.dtype(np.float16): 9,
    np.dtype(np.float32): 10,
    np.dtype(np.float64): 11,
}
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bool mask (N,) -> ceil(N/8) uint8 bytes, little bit order (position 8j+i is bit i of byte j)."""
    mask = _as_mask(mask)
    return np.packbits(mask, bitorder="little")


def unpack_mask(buf: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`; rejects a wrong length or non-zero padding bits."""
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise EncodingError(f"packed mask must be a 1-D uint8 array, got {buf.dtype} {buf.shape}")
    if n < 0 or buf.size != bitmask_nbytes(n):
        raise EncodingError(f"packed mask of {buf.size} bytes does not hold {n} bits")
    if n % 8 and buf[-1] >> (n % 8):
        raise EncodingError("packed mask has non-zero padding bits")
    return np.unpackbits(buf, count=n, bitorder="little").astype(bool)


def gather_values(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The kept values ``values[mask]`` as a contiguous 1-D array."""
    values = np.asarray(values)
    mask = _as_mask(mask)
    if values.shape != mask.shape:
        raise EncodingError(f"values shape {values.shape} does not match mask shape {mask.shape}")
    return np.ascontiguousarray(values[mask])


def scatter_values(packed: np.ndarray, mask: np.ndarray, dtype: DTypeLike | None = None) -> np.ndarray:
    """Dense (N,) array with ``packed`` at the kept positions and zeros elsewhere."""
    packed = np.asarray(packed)
    mask = _as_mask(mask)
    nnz = int(np.count_nonzero(mask))
    if packed.shape != (nnz,):
        raise EncodingError(f"{packed.size} packed values for a mask that keeps {nnz} positions")
    out = np.zeros(mask.size, dtype=packed.dtype if dtype is None else dtype)
    out[mask] = packed
    return out


def encoded_nbytes(n: int, nnz: int, dtype: DTypeLike) -> int:
    """Exact size in bytes of ``encode`` for N = ``n``, ``nnz`` kept positions and ``dtype``."""
    dtype = _check_dtype(dtype)
    if n < 0 or not 0 <= nnz <= n:
        raise EncodingError(f"need 0 <= nnz <= n, got n={n}, nnz={nnz}")
    return int(HEADER_NBYTES + _mask_nbytes(n, nnz, _layout(n, nnz)) + nnz * dtype.itemsize)


def encode(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Encode the kept entries of a flat vector into one contiguous uint8 buffer.

    ``mask`` None means ``values != 0``. Only ``values[mask]`` is stored: decode gives
    zeros wherever the mask is False.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise EncodingError(f"values must be a flat 1-D vector, got shape {values.shape}")
    dtype = _check_dtype(values.dtype)
    mask = values != 0 if mask is None else _as_mask(mask)
    if mask.shape != values.shape:
        raise EncodingError(f"mask shape {mask.shape} does not match values shape {values.shape}")
    n, nnz = values.size, int(np.count_nonzero(mask))
    layout = _layout(n, nnz)
    out = np.empty(encoded_nbytes(n, nnz, dtype), dtype=np.uint8)
    out[:HEADER_NBYTES] = np.frombuffer(_HEADER.pack(MAGIC, layout, DTYPE_CODES[dtype], 0, n, nnz), dtype=np.uint8)
    offset = HEADER_NBYTES + _mask_nbytes(n, nnz, layout)
    if layout == LAYOUT_BITMASK:
        out[HEADER_NBYTES:offset] = pack_mask(mask)
    else:
        indices: np.ndarray = np.flatnonzero(mask).astype(_index_dtype(n))
        out[HEADER_NBYTES:offset] = indices.view(np.uint8)
    kept = np.ascontiguousarray(values[mask], dtype=dtype.newbyteorder("<"))
    out[offset:] = kept.view(np.uint8)
    return out


def decode(buf: object, expected_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode an :func:`encode` buffer into (dense values (N,) of the original dtype, mask (N,)).

    Every field is checked before anything of size N is allocated. ``expected_n``, when
    given, must equal the header's N (the server and the learners know the model size);
    otherwise N may be at most ``MAX_N``, and its values take at most as many bytes as a
    float32 vector of ``MAX_N``.
    Any inconsistency raises :class:`EncodingError`.
    """
    data = _as_bytes(buf)
    if data.size < HEADER_NBYTES:
        raise EncodingError(f"buffer of {data.size} bytes is shorter than the {HEADER_NBYTES}-byte header")
    magic, layout, code, reserved, n, nnz = _HEADER.unpack(data[:HEADER_NBYTES].tobytes())
    if magic != MAGIC:
        raise EncodingError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if layout not in (LAYOUT_BITMASK, LAYOUT_INDEX):
        raise EncodingError(f"unknown layout code {layout}")
    if code not in _CODE_DTYPES:
        raise EncodingError(f"unknown dtype code {code}")
    if reserved != 0:
        raise EncodingError(f"reserved header field is {reserved}, expected 0")
    if expected_n is not None and n != expected_n:
        raise EncodingError(f"buffer holds a vector of length {n}, expected {expected_n}")
    if expected_n is None and n > MAX_N:
        raise EncodingError(f"vector length {n} exceeds MAX_N={MAX_N}; pass expected_n to allow it")
    if nnz > n:
        raise EncodingError(f"nnz={nnz} exceeds the vector length {n}")
    dtype = _CODE_DTYPES[code]
    if expected_n is None and n * dtype.itemsize > 4 * MAX_N:
        raise EncodingError(
            f"{n} {dtype} values take {n * dtype.itemsize} bytes, over the {4 * MAX_N} of {MAX_N} float32 "
            "(MAX_N); pass expected_n to allow it"
        )
    canonical = _layout(n, nnz)
    if layout != canonical:
        raise EncodingError(f"layout {layout} is not the smaller one ({canonical}) for n={n}, nnz={nnz}")
    mask_nbytes = _mask_nbytes(n, nnz, layout)
    expected = HEADER_NBYTES + mask_nbytes + nnz * dtype.itemsize
    if data.size != expected:
        raise EncodingError(f"buffer is {data.size} bytes, the header implies {expected}")

    section = data[HEADER_NBYTES : HEADER_NBYTES + mask_nbytes]
    if layout == LAYOUT_BITMASK:
        mask = unpack_mask(section, n)
        if int(np.count_nonzero(mask)) != nnz:
            raise EncodingError(f"bitmask keeps {np.count_nonzero(mask)} positions, header says nnz={nnz}")
    else:
        indices = section.view(np.dtype(_index_dtype(n)).newbyteorder("<"))
        if nnz and int(indices[-1]) >= n:
            raise EncodingError(f"index {int(indices[-1])} out of range for length {n}")
        if np.any(indices[1:] <= indices[:-1]):
            raise EncodingError("indices are not strictly increasing")
        mask = np.zeros(n, dtype=bool)
        mask[indices] = True

    raw = data[HEADER_NBYTES + mask_nbytes :]
    if dtype == np.bool_ and np.any(raw > 1):
        raise EncodingError("bool values must be stored as bytes 0 or 1")
    kept = raw.view(dtype.newbyteorder("<")).astype(dtype)
    return scatter_values(kept, mask), mask


def bitmask_nbytes(n: int) -> int:
    """Bytes of a bitmask over n positions (one bit each, the last byte padded)."""
    return (n + 7) // 8


def _index_dtype(n: int) -> type:
    if n <= 1 << 16:
        return np.uint16
    if n <= 1 << 32:
        return np.uint32
    return np.uint64


def _index_nbytes(n: int, nnz: int) -> int:
    return nnz * np.dtype(_index_dtype(n)).itemsize


def _layout(n: int, nnz: int) -> int:
    """The one layout a buffer of N = ``n`` and ``nnz`` kept positions may have: the smaller, the bitmask on a tie."""
    return LAYOUT_BITMASK if bitmask_nbytes(n) <= _index_nbytes(n, nnz) else LAYOUT_INDEX


def _mask_nbytes(n: int, nnz: int, layout: int) -> int:
    """Bytes of the positions' section in ``layout``."""
    return bitmask_nbytes(n) if layout == LAYOUT_BITMASK else _index_nbytes(n, nnz)


def _check_dtype(dtype: DTypeLike) -> np.dtype:
    try:
        checked = np.dtype(dtype)
    except TypeError as exc:
        raise EncodingError(f"not a numpy dtype: {dtype!r}") from exc
    native: np.dtype = checked.newbyteorder("=")
    if native not in DTYPE_CODES:
        raise EncodingError(f"unsupported dtype {dtype}; supported: {sorted(str(d) for d in DTYPE_CODES)}")
    return native


def _as_mask(mask: np.ndarray) -> np.ndarray:
    return bool_vector(mask, error=EncodingError)


def _as_bytes(buf: object) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise EncodingError(f"buffer must be a 1-D uint8 array, got {buf.dtype} {buf.shape}")
        return np.ascontiguousarray(buf)
    try:
        return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]
    except TypeError as exc:
        raise EncodingError(f"buffer must be bytes-like or a uint8 array, got {type(buf).__name__}") from exc
