import struct

import numpy as np
import pytest

from fedmpi.encoding import (
    DTYPE_CODES,
    HEADER_NBYTES,
    MAX_N,
    EncodingError,
    decode,
    encode,
    encoded_nbytes,
    gather_values,
    pack_mask,
    scatter_values,
    unpack_mask,
)

DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
]
SIZES = [0, 1, 7, 8, 9, 1000, 70000]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def make_vector(rng, n, s, dtype):
    """Random vector of ``dtype`` without zeros, and a mask pruning round(s*n) positions."""
    if dtype == np.bool_:
        values = np.ones(n, bool)
    elif np.issubdtype(dtype, np.floating):
        values = (rng.standard_normal(n) + 3).astype(dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(max(info.min, -1000), min(info.max, 1000), n, endpoint=True).astype(dtype)
        values[values == 0] = 1
    mask = np.ones(n, bool)
    mask[rng.permutation(n)[: round(s * n)]] = False
    return values, mask


def layout_sizes(n, nnz):
    index_width = 2 if n <= 65536 else 4
    return (n + 7) // 8, nnz * index_width


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_size_and_sparsity(dtype):
    rng = np.random.default_rng(0)
    for n in SIZES:
        for s in SPARSITIES:
            values, mask = make_vector(rng, n, s, dtype)
            dense = np.where(mask, values, np.zeros((), dtype))
            nnz = int(mask.sum())
            bitmask, index = layout_sizes(n, nnz)
            expected_size = HEADER_NBYTES + min(bitmask, index) + nnz * np.dtype(dtype).itemsize
            for buf in (encode(values, mask), encode(dense)):  # explicit mask, and mask = values != 0
                assert buf.dtype == np.uint8 and buf.flags.c_contiguous
                assert len(buf) == encoded_nbytes(n, nnz, dtype) == expected_size
                assert buf[4] == (0 if bitmask <= index else 1)
                out, out_mask = decode(buf)
                assert out.dtype == np.dtype(dtype) and out.shape == (n,)
                np.testing.assert_array_equal(out_mask, mask)
                np.testing.assert_array_equal(out, dense)
                assert decode(buf.tobytes(), expected_n=n)[1].sum() == nnz


def test_explicit_mask_may_keep_zeros():
    values = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    mask = np.array([True, True, False, False])
    out, out_mask = decode(encode(values, mask))
    assert out.tolist() == [0.0, 1.0, 0.0, 0.0] and out_mask.tolist() == mask.tolist()


def test_special_floats_and_byte_order():
    values = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-300], ">f8")
    out, mask = decode(encode(values))
    assert mask.tolist() == [True, True, True, False, True]
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, values.astype(np.float64))


def test_header_layout_is_documented_little_endian():
    buf = encode(np.array([0, 5, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.int16))
    magic, layout, code, reserved, n, nnz = struct.unpack("<4sBBHQQ", buf[:HEADER_NBYTES].tobytes())
    assert (magic, layout, code, reserved, n, nnz) == (b"FSP1", 0, 3, 0, 20, 2)  # 3 bytes < 2 * 2 bytes
    assert buf[HEADER_NBYTES : HEADER_NBYTES + 3].tolist() == [0b00010010, 0, 0]
    assert buf[HEADER_NBYTES + 3 :].view("<i2").tolist() == [5, 7]
    buf = encode(np.eye(1, 100, 98, dtype=np.float32)[0])  # one nonzero: 2 index bytes < 13 mask bytes
    assert buf[4] == 1
    assert buf[HEADER_NBYTES : HEADER_NBYTES + 2].view("<u2").tolist() == [98]


def test_large_vector_uses_uint32_indices():
    n = 70000
    values = np.zeros(n, np.float32)
    values[[3, 69999]] = [1.0, 2.0]
    buf = encode(values)
    assert len(buf) == HEADER_NBYTES + 2 * 4 + 2 * 4
    assert buf[HEADER_NBYTES : HEADER_NBYTES + 8].view("<u4").tolist() == [3, 69999]


def test_pack_unpack_mask_little_bit_order():
    mask = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], bool)
    packed = pack_mask(mask)
    assert packed.tolist() == [0b10000001, 0b00000011]
    np.testing.assert_array_equal(unpack_mask(packed, 10), mask)
    with pytest.raises(EncodingError, match="padding"):
        unpack_mask(np.array([0, 0b100], np.uint8), 10)
    with pytest.raises(EncodingError, match="bits"):
        unpack_mask(packed, 17)


def test_gather_scatter():
    values = np.array([1.5, 0.0, -2.0, 4.0], np.float32)
    mask = np.array([True, False, True, False])
    packed = gather_values(values, mask)
    assert packed.tolist() == [1.5, -2.0] and packed.flags.c_contiguous
    assert scatter_values(packed, mask).tolist() == [1.5, 0.0, -2.0, 0.0]
    assert scatter_values(packed, mask, dtype=np.float64).dtype == np.float64
    with pytest.raises(EncodingError, match="keeps 2"):
        scatter_values(packed[:1], mask)


def test_unsupported_inputs():
    with pytest.raises(EncodingError, match="unsupported dtype"):
        encode(np.ones(3, np.complex64))
    with pytest.raises(EncodingError, match="1-D"):
        encode(np.ones((2, 2)))
    with pytest.raises(EncodingError, match="shape"):
        encode(np.ones(3), np.ones(4, bool))
    with pytest.raises(EncodingError, match="nnz"):
        encoded_nbytes(3, 4, np.float32)
    with pytest.raises(EncodingError, match="bytes-like"):
        decode(12345)


def _sample(layout):
    """A valid bitmask-layout (n=20, 10 kept) or index-layout (n=100, 3 kept) float32 buffer."""
    values = np.zeros(20 if layout == 0 else 100, np.float32)
    values[[1, 4, 5, 6, 8, 10, 11, 12, 15, 19] if layout == 0 else [2, 50, 97]] = 1.0
    buf = encode(values)
    assert buf[4] == layout
    return buf.copy()


def _with_header(buf, **fields):
    names = ["magic", "layout", "code", "reserved", "n", "nnz"]
    header = dict(zip(names, struct.unpack("<4sBBHQQ", buf[:HEADER_NBYTES].tobytes())))
    header.update(fields)
    out = buf.copy()
    out[:HEADER_NBYTES] = np.frombuffer(struct.pack("<4sBBHQQ", *[header[k] for k in names]), np.uint8)
    return out


@pytest.mark.parametrize("layout", [0, 1])
def test_corrupt_buffers_raise(layout):
    good = _sample(layout)
    decode(good)
    bad = {  # name: (buffer, what decode must say about it)
        "truncated": (good[:-1], "header implies"),
        "truncated header": (good[:10], "shorter than"),
        "empty": (good[:0], "shorter than"),
        "extra bytes": (np.concatenate([good, np.zeros(1, np.uint8)]), "header implies"),
        "bad magic": (_with_header(good, magic=b"FSP2"), "bad magic"),
        "bad layout": (_with_header(good, layout=7), "unknown layout"),
        "bad dtype": (_with_header(good, code=200), "unknown dtype"),
        "reserved": (_with_header(good, reserved=1), "reserved"),
        "nnz > n": (_with_header(good, nnz=1000), "nnz=1000 exceeds"),
        "huge n": (_with_header(good, n=2**63), "exceeds MAX_N"),
    }
    if layout == 0:
        flipped = good.copy()
        flipped[HEADER_NBYTES] ^= 1  # one more kept bit than nnz says
        bad["nnz mismatch"] = (flipped, "bitmask keeps")
        bad["other layout"] = (_with_header(good, layout=1), "not the smaller one")
    else:
        idx = good[HEADER_NBYTES : HEADER_NBYTES + 6].view("<u2")
        index_cases = [
            ("out of range", [2, 50, 100], "out of range"),
            ("unsorted", [50, 2, 97], "strictly increasing"),
            ("duplicate", [2, 50, 50], "strictly increasing"),
        ]
        for name, new, says in index_cases:
            corrupt = good.copy()
            corrupt[HEADER_NBYTES : HEADER_NBYTES + 6] = np.array(new, "<u2").view(np.uint8)
            bad[name] = (corrupt, says)
        assert idx.tolist() == [2, 50, 97]
        bad["other layout"] = (_with_header(good, layout=0), "not the smaller one")
        bad["nnz mismatch"] = (_with_header(good, nnz=2), "header implies")
    for buf, says in bad.values():
        with pytest.raises(EncodingError, match=says):
            decode(buf)
        with pytest.raises(ValueError, match=says):  # EncodingError is a ValueError
            decode(buf.tobytes())


def test_corrupt_bool_values_and_expected_n():
    buf = encode(np.array([True, False, True]))
    buf[-1] = 2
    with pytest.raises(EncodingError, match="bool"):
        decode(buf)
    good = _sample(1)
    with pytest.raises(EncodingError, match="expected 99"):
        decode(good, expected_n=99)


def test_header_cannot_force_a_huge_allocation():
    # index layout with nnz = 0 is a legal 24-byte encoding of any N, so N is capped
    header = struct.pack("<4sBBHQQ", b"FSP1", 1, 10, 0, MAX_N + 1, 0)
    with pytest.raises(EncodingError, match="MAX_N"):
        decode(header)
    # expected_n lifts the cap, but a fully kept N = 2^40 in the bitmask layout must carry N/8 + 4N bytes
    header = struct.pack("<4sBBHQQ", b"FSP1", 0, 10, 0, 2**40, 2**40)
    with pytest.raises(EncodingError, match="header implies"):
        decode(header, expected_n=2**40)


def test_fully_pruned_vector_is_just_a_header():
    buf = encode(np.zeros(1000, np.float32))
    assert len(buf) == HEADER_NBYTES
    out, mask = decode(buf)
    assert not mask.any() and out.shape == (1000,) and not out.any()


def test_index_width_changes_exactly_at_2_16_and_2_32():
    """uint16 indices up to N = 2^16 inclusive, uint32 up to 2^32, then uint64 (one kept float32 each)."""
    f4 = np.float32
    assert encoded_nbytes(1 << 16, 1, f4) == HEADER_NBYTES + 2 + 4
    assert encoded_nbytes((1 << 16) + 1, 1, f4) == HEADER_NBYTES + 4 + 4
    assert encoded_nbytes(1 << 32, 1, f4) == HEADER_NBYTES + 4 + 4
    assert encoded_nbytes((1 << 32) + 1, 1, f4) == HEADER_NBYTES + 8 + 4


def test_dtype_codes_are_pinned():
    """The header's dtype code is part of the format on disk and on the wire: a renumbering (two codes swapped)
    would still round-trip within one version and misread every buffer written by another."""
    codes = {
        np.bool_: 0,
        np.int8: 1,
        np.uint8: 2,
        np.int16: 3,
        np.uint16: 4,
        np.int32: 5,
        np.uint32: 6,
        np.int64: 7,
        np.uint64: 8,
        np.float16: 9,
        np.float32: 10,
        np.float64: 11,
    }
    for dtype, code in codes.items():
        assert encode(np.ones(1, dtype))[5] == code, dtype
        header = struct.pack("<4sBBHQQ", b"FSP1", 1, code, 0, 100, 0)  # 100 positions, none kept
        assert decode(header)[0].dtype == dtype


def test_max_n_itself_is_allowed(monkeypatch):
    """N may be at most MAX_N (a cap of 16 here, so that the allowed case allocates nothing large)."""
    from fedmpi import encoding

    monkeypatch.setattr(encoding, "MAX_N", 16)
    assert decode(struct.pack("<4sBBHQQ", b"FSP1", 1, 10, 0, 16, 0))[1].shape == (16,)
    with pytest.raises(EncodingError, match="MAX_N"):
        decode(struct.pack("<4sBBHQQ", b"FSP1", 1, 10, 0, 17, 0))


def test_helpers_refuse_malformed_arguments_with_encoding_errors():
    with pytest.raises(EncodingError, match="does not hold -1 bits"):
        unpack_mask(np.zeros(0, np.uint8), -1)
    with pytest.raises(EncodingError, match="uint8"):
        unpack_mask(np.zeros(2, np.int16), 10)
    with pytest.raises(EncodingError, match="does not match mask shape"):
        gather_values(np.ones(5, np.float32), np.ones(4, bool))
    with pytest.raises(EncodingError, match="1-D uint8"):  # an array is not read as its bytes
        decode(np.zeros(HEADER_NBYTES, np.float32))


def test_a_wider_dtype_does_not_multiply_what_max_n_allows(monkeypatch):
    """Without expected_n the dense values may take what a float32 vector of MAX_N takes (a cap of 16 here): a
    float64 header of MAX_N values asked for twice that (8 GiB at the real MAX_N), a bool one for a quarter."""
    from fedmpi import encoding

    monkeypatch.setattr(encoding, "MAX_N", 16)
    float64, boolean = DTYPE_CODES[np.dtype(np.float64)], DTYPE_CODES[np.dtype(np.bool_)]
    assert decode(struct.pack("<4sBBHQQ", b"FSP1", 1, float64, 0, 8, 0))[0].dtype == np.float64
    with pytest.raises(EncodingError, match=r"^9 float64 values take 72 bytes, over the 64 of 16 float32 \(MAX_N\)"):
        decode(struct.pack("<4sBBHQQ", b"FSP1", 1, float64, 0, 9, 0))
    assert decode(struct.pack("<4sBBHQQ", b"FSP1", 1, float64, 0, 9, 0), expected_n=9)[1].shape == (9,)
    assert decode(struct.pack("<4sBBHQQ", b"FSP1", 1, boolean, 0, 16, 0))[1].shape == (16,)  # MAX_N still caps N
    with pytest.raises(EncodingError, match="exceeds MAX_N"):
        decode(struct.pack("<4sBBHQQ", b"FSP1", 1, boolean, 0, 17, 0))
