"""Code storage: int4 packing and the per-bit-width storage format."""

import pytest
import torch

from ditq.errors import DitqError
from ditq.quant import (
    integer_range,
    pack_codes,
    pack_int4,
    storage_dtype_for,
    unpack_codes,
    unpack_int4,
)


def test_pack_int4_known_bytes_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 3, 10], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [0x21, 0x0F, 0xA3]
    assert unpack_int4(torch.tensor([0x21, 0xA3], dtype=torch.uint8)).tolist() == [1, 2, 3, 10]


@pytest.mark.parametrize(("shape", "dim"), [((3, 8, 6), -1), ((4, 5), 0), ((2, 6, 3), 1)])
def test_pack_unpack_round_trip(shape, dim):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, shape, generator=generator, dtype=torch.uint8)
    packed = pack_int4(codes, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] //= 2
    assert packed.dtype == torch.uint8 and list(packed.shape) == expected_shape
    assert torch.equal(unpack_int4(packed, dim=dim), codes)


def test_pack_int4_rejects_bad_input():
    with pytest.raises(DitqError, match="even size"):
        pack_int4(torch.zeros(3, 5, dtype=torch.uint8))
    with pytest.raises(DitqError, match=r"\[0, 15\], got 16"):
        pack_int4(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(DitqError, match="uint8 codes, got torch.int32"):
        pack_int4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(DitqError, match="uint8 bytes"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


@pytest.mark.parametrize(
    ("bits", "symmetric", "dtype"),
    [
        (2, True, torch.uint8),
        (3, False, torch.uint8),
        (4, True, torch.uint8),
        (4, False, torch.uint8),
        (5, True, torch.int8),
        (6, False, torch.uint8),
        (8, True, torch.int8),
        (8, False, torch.uint8),
    ],
)
def test_storage_dtype_and_codes_round_trip(bits, symmetric, dtype):
    assert storage_dtype_for(bits, symmetric) == dtype
    q_min, q_max = integer_range(bits, symmetric)
    every_code = torch.arange(q_min, q_max + 1)
    codes = every_code.repeat(3, 2).to(torch.int8 if symmetric else torch.uint8)
    stored = pack_codes(codes, bits, symmetric)
    assert stored.dtype == dtype
    assert stored.shape[-1] == (codes.shape[-1] // 2 if bits <= 4 else codes.shape[-1])
    assert torch.equal(unpack_codes(stored, bits, symmetric), codes)


def test_symmetric_int4_storage_is_offset_binary():
    codes = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)
    assert pack_codes(codes, 4, symmetric=True).tolist() == [0xF0, 0x78]


def test_storage_errors_and_fp8():
    assert storage_dtype_for(8, True, fmt="fp8_e4m3") == torch.float8_e4m3fn
    with pytest.raises(DitqError, match="no code storage for 16-bit"):
        storage_dtype_for(16, False)
    with pytest.raises(DitqError, match="symmetric codes must be torch.int8"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 4, symmetric=True)
