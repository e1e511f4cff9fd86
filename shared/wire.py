"""Tensors on the wire: a small msgspec header (dtype, shape, layout) in front of the raw bytes. Never pickle.

Two forms, same header:
- `WireTensor`: a msgspec Struct whose `data` is a msgpack *bin* field, so any bus message can carry a tensor as a
  field (`kv: WireTensor`) and msgspec decodes `data` as a view into the received buffer.
- a frame (`encode_frame` / `decode_frame`): `u32 header length | msgpack header | zero padding | raw bytes`, for
  stores that keep one opaque value per key (the kvstore's shared-memory and Redis backends). The padding puts the
  raw bytes at a multiple of 16 from the frame's start, so a frame in a page-aligned shared-memory segment is viewed
  as a tensor in place (a float64 view needs 8-byte alignment).

Bytes are the tensor's contiguous row-major memory in little-endian order; `layout` names the axes (for KV blocks
`KV_BLOCK_LAYOUT`) so a reader can refuse a tensor laid out for someone else. bfloat16 and float8 have no numpy
dtype, so conversion goes through a uint8 view of the tensor and never through numpy's dtypes.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings

import msgspec
import torch

from specrelay.shared.errors import SpecrelayError

# Axes of one KV block as the kvstore holds it: [num_layers, 2 (K, V), block_size, num_kv_heads, head_dim].
KV_BLOCK_LAYOUT = "layer,kv,token,kv_head,head_dim"

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
    if hasattr(torch, name)
}

if sys.byteorder != "little":  # every deployment target is little-endian; a mixed cluster would corrupt KV silently
    raise ImportError("specrelay's tensor wire format assumes a little-endian host")


class WireFormatError(SpecrelayError):
    """Bytes that do not match their header (wrong length, unknown dtype, unexpected layout)."""


class TensorHeader(msgspec.Struct, frozen=True, array_like=True):
    dtype: str  # a key of DTYPES, e.g. "bfloat16"
    shape: tuple[int, ...]
    layout: str = ""  # axis names, comma-separated; "" when the reader needs no check

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch_dtype(self.dtype).itemsize


class WireTensor(msgspec.Struct, frozen=True):
    header: TensorHeader
    data: memoryview  # msgpack bin; on decode a zero-copy view into the received message

    @classmethod
    def from_torch(cls, tensor: torch.Tensor, layout: str = "") -> WireTensor:
        header, data = tensor_to_bytes(tensor, layout)
        return cls(header, data)

    def to_torch(self, *, expect_layout: str | None = None, device: torch.device | str | None = None,
                 copy: bool | None = None) -> torch.Tensor:
        return tensor_from_bytes(self.header, self.data, expect_layout=expect_layout, device=device, copy=copy)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise WireFormatError(f"unsupported tensor dtype {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WireFormatError(f"cannot send a tensor of dtype {name}; known: {', '.join(DTYPES)}")
    return name


def tensor_to_bytes(tensor: torch.Tensor, layout: str = "") -> tuple[TensorHeader, memoryview]:
    """The header and a read-only view of the tensor's bytes. Zero-copy for a contiguous CPU tensor (the view keeps
    the tensor alive); a device or strided tensor is first copied to contiguous CPU memory."""
    header = TensorHeader(dtype_name(tensor.dtype), tuple(tensor.shape), layout)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return header, memoryview(b"")
    return header, memoryview(flat.view(torch.uint8).numpy()).toreadonly()


def tensor_from_bytes(header: TensorHeader, data: bytes | bytearray | memoryview, *,
                      expect_layout: str | None = None, device: torch.device | str | None = None,
                      copy: bool | None = None) -> torch.Tensor:
    """The tensor behind `header`. `copy=None` shares memory with a writable buffer (a shared-memory segment, a
    bytearray) and copies a read-only one (bytes, a decoded message), so that an in-place write can never change
    an immutable object. With `device` the bytes are viewed, not copied, on their way to the device: one copy."""
    if expect_layout is not None and header.layout != expect_layout:
        raise WireFormatError(f"tensor layout is {header.layout!r}, expected {expect_layout!r}")
    dtype = torch_dtype(header.dtype)
    view = memoryview(data).cast("B")
    if view.nbytes != header.nbytes:
        raise WireFormatError(
            f"tensor of {header.dtype}{list(header.shape)} needs {header.nbytes} bytes, got {view.nbytes}"
        )
    if view.nbytes == 0:
        return torch.empty(header.shape, dtype=dtype, device=device)
    if copy is None:
        copy = view.readonly and device is None
    if copy:
        # A plain memcpy: torch's clone() goes through the intra-op thread pool, which costs milliseconds per MiB
        # when the cores are contended (measured: 15 ms vs 0.1 ms for 2 MiB on a busy 2-core host).
        view = memoryview(bytearray(view))
    with warnings.catch_warnings():
        # frombuffer warns on read-only memory; we only read such a view (on the way to a device), never write it.
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(view, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:  # a view into a msgpack message may sit at any address
        raw = torch.frombuffer(bytearray(view), dtype=torch.uint8)
    tensor = raw.view(dtype).reshape(header.shape)
    return tensor if device is None else tensor.to(device, copy=True)


_FRAME_LEN = struct.Struct("<I")
FRAME_ALIGN = 16
_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(TensorHeader)


def _data_offset(header_len: int) -> int:
    return -(-(_FRAME_LEN.size + header_len) // FRAME_ALIGN) * FRAME_ALIGN


def encode_frame(header: bytes, data: bytes | memoryview) -> bytes:
    """`u32 len(header) | header | padding | data` as one bytes object (one copy of `data`)."""
    padding = bytes(_data_offset(len(header)) - _FRAME_LEN.size - len(header))
    return b"".join((_FRAME_LEN.pack(len(header)), header, padding, data))


def frame_size(header_len: int, data_len: int) -> int:
    return _data_offset(header_len) + data_len


def decode_frame(frame: bytes | bytearray | memoryview) -> tuple[memoryview, memoryview]:
    """Views of the header and the data of a frame; no copy."""
    view = memoryview(frame).cast("B")
    if view.nbytes < _FRAME_LEN.size:
        raise WireFormatError(f"frame of {view.nbytes} bytes is shorter than its length prefix")
    (header_len,) = _FRAME_LEN.unpack_from(view)
    start = _data_offset(header_len)
    if start > view.nbytes:
        raise WireFormatError(f"frame header claims {header_len} bytes, only {view.nbytes - _FRAME_LEN.size} follow")
    return view[_FRAME_LEN.size:_FRAME_LEN.size + header_len], view[start:]


def encode_tensor_frame(tensor: torch.Tensor, layout: str = "") -> bytes:
    header, data = tensor_to_bytes(tensor, layout)
    return encode_frame(_header_encoder.encode(header), data)


def decode_tensor_frame(frame: bytes | bytearray | memoryview, **kwargs) -> torch.Tensor:
    """The tensor in a frame written by `encode_tensor_frame`; keyword arguments as `tensor_from_bytes`."""
    header_bytes, data = decode_frame(frame)
    try:
        header = _header_decoder.decode(header_bytes)
    except msgspec.DecodeError as e:
        raise WireFormatError(f"bad tensor header: {e}") from None
    return tensor_from_bytes(header, data, **kwargs)
