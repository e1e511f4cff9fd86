"""The tensor wire format: every dtype (bfloat16 too) survives a round trip bit for bit, inside a bus message and
as a frame; memory is shared where it is safe and copied where it is not; bad bytes are refused with a clear error."""

from __future__ import annotations

import msgspec
import pytest
import torch

from specrelay.shared.wire import (
    DTYPES,
    KV_BLOCK_LAYOUT,
    TensorHeader,
    WireFormatError,
    WireTensor,
    decode_frame,
    decode_tensor_frame,
    encode_frame,
    encode_tensor_frame,
    tensor_from_bytes,
    tensor_to_bytes,
)


def _sample(dtype: torch.dtype, shape=(2, 3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float8 and bfloat16 have no torch.equal on every build, and NaN != NaN: compare the bytes themselves.
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )


class Carrier(msgspec.Struct):
    request_id: str
    kv: WireTensor


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_inside_a_bus_message(name):
    tensor = _sample(DTYPES[name])
    encoded = msgspec.msgpack.encode(Carrier("r1", WireTensor.from_torch(tensor, layout="a,b,c")))
    decoded = msgspec.msgpack.decode(encoded, type=Carrier)
    assert decoded.kv.header == TensorHeader(name, (2, 3, 5), "a,b,c")
    assert _same_bits(decoded.kv.to_torch(expect_layout="a,b,c"), tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_as_a_frame(name):
    tensor = _sample(DTYPES[name], shape=(4, 2, 16, 2, 8))
    frame = encode_tensor_frame(tensor, KV_BLOCK_LAYOUT)
    assert len(frame) > tensor.numel() * tensor.element_size()
    assert _same_bits(decode_tensor_frame(frame, expect_layout=KV_BLOCK_LAYOUT), tensor)


def test_bfloat16_bytes_are_the_tensor_memory_and_message_overhead_is_small():
    tensor = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    header, data = tensor_to_bytes(tensor)
    assert bytes(data) == bytes(tensor.view(torch.uint8).numpy())  # raw little-endian bf16, no base64, no pickle
    big = torch.zeros(1024, 1024, dtype=torch.bfloat16)
    encoded = msgspec.msgpack.encode(Carrier("r", WireTensor.from_torch(big)))
    assert len(encoded) - big.numel() * 2 < 64


def test_scalars_empty_and_strided_tensors_round_trip():
    for tensor in (torch.tensor(3.5), torch.empty(0, 4), torch.arange(12.0).reshape(3, 4).t(), torch.arange(10)[::3]):
        header, data = tensor_to_bytes(tensor)
        assert _same_bits(tensor_from_bytes(header, data), tensor)


def test_encoding_a_contiguous_cpu_tensor_copies_nothing():
    tensor = torch.arange(8, dtype=torch.float32)
    _, data = tensor_to_bytes(tensor)
    tensor[0] = 42.0  # the view sees a later write: it is the tensor's memory, not a copy
    assert torch.frombuffer(bytearray(data), dtype=torch.float32)[0].item() == 42.0
    assert data.readonly


def test_writable_buffers_are_shared_and_read_only_ones_are_copied():
    tensor = torch.arange(6, dtype=torch.int32)
    frame = bytearray(encode_tensor_frame(tensor))
    shared = decode_tensor_frame(frame)
    shared[0] = 7
    assert decode_tensor_frame(frame)[0].item() == 7  # the decoded tensor is a view into the bytearray

    immutable = bytes(encode_tensor_frame(tensor))
    private = decode_tensor_frame(immutable)
    private[0] = 9
    assert decode_tensor_frame(immutable)[0].item() == 0  # bytes are never written through


def test_unaligned_views_decode_correctly():
    tensor = torch.randn(33, dtype=torch.float64)
    header, data = tensor_to_bytes(tensor)
    buf = bytearray(1) + bytearray(data)  # the payload starts at an odd address
    assert _same_bits(tensor_from_bytes(header, memoryview(buf)[1:]), tensor)


def test_wrong_length_layout_dtype_and_truncated_frames_are_refused():
    header, data = tensor_to_bytes(torch.zeros(4, dtype=torch.float16), layout="x")
    with pytest.raises(WireFormatError, match="needs 8 bytes, got 6"):
        tensor_from_bytes(header, bytes(data)[:6])
    with pytest.raises(WireFormatError, match="layout is 'x', expected 'y'"):
        tensor_from_bytes(header, data, expect_layout="y")
    with pytest.raises(WireFormatError, match="unsupported tensor dtype 'complex64'"):
        tensor_from_bytes(TensorHeader("complex64", (1,)), b"\0" * 8)
    with pytest.raises(WireFormatError, match="cannot send a tensor of dtype complex64"):
        tensor_to_bytes(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(WireFormatError, match="claims 100 bytes"):
        decode_frame(encode_frame(b"x" * 100, b"")[:50])


def test_to_device_views_then_copies_once():
    tensor = torch.randn(3, 4).to(torch.float16)
    header, data = tensor_to_bytes(tensor)
    moved = tensor_from_bytes(header, bytes(data), device="cpu")
    assert _same_bits(moved, tensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_device_tensor_leaves_and_returns_to_the_device():
    kv = torch.randn(2, 2, 16, 2, 8, device="cuda").to(torch.bfloat16)
    back = decode_tensor_frame(encode_tensor_frame(kv, KV_BLOCK_LAYOUT), device="cuda")
    assert back.is_cuda and torch.equal(back, kv)
