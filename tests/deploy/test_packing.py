"""Sign-bit packing: round trips on odd sizes, zeros as a third state, layout, errors."""
import pytest
import torch

from bimacosr.deploy.packing import pack_signs, packed_row_bytes, unpack_signs


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 9), (13, 3, 3, 3), (7, 5, 1, 1), (2, 8), (4, 17, 3, 3)])
def test_round_trip_on_odd_counts(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    bits, zeros = pack_signs(w)
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (shape[0], packed_row_bytes(shape))
    assert zeros.numel() == 0
    signs = unpack_signs(bits, shape, zeros)
    assert signs.dtype == torch.int8 and torch.equal(signs, torch.sign(w).to(torch.int8))


def test_exact_zeros_round_trip_as_zero():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    w.view(-1)[torch.tensor([0, 7, 44, 269])] = 0.0
    w[2, 1, 0, 0] = -0.0
    bits, zeros = pack_signs(w)
    assert zeros.tolist() == sorted(zeros.tolist()) and len(zeros) == 5
    assert torch.equal(unpack_signs(bits, w.shape, zeros), torch.sign(w).to(torch.int8))
    # without the zero list every zero comes back as -1 (its bit is 0)
    no_zeros = unpack_signs(bits, w.shape)
    assert (no_zeros.view(-1)[zeros] == -1).all()


def test_bit_layout_is_lsb_first_with_zero_padding():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -2.0]])
    bits, _ = pack_signs(w)
    assert bits.tolist() == [[0b10001101, 0b00000001]]


def test_float_output_dtype():
    w = torch.randn(3, 11)
    bits, zeros = pack_signs(w)
    signs = unpack_signs(bits, w.shape, zeros, dtype=torch.float32)
    assert torch.equal(signs, torch.sign(w))


def test_mismatched_or_invalid_inputs_are_refused():
    bits, _ = pack_signs(torch.randn(4, 10))
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_signs(bits, (4, 17))
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_signs(bits.to(torch.int16), (4, 10))
    with pytest.raises(ValueError, match="out of range"):
        unpack_signs(bits, (4, 10), torch.tensor([40]))
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(torch.tensor([[1.0, float("nan")]]))
