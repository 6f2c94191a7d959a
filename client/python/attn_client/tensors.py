"""numpy arrays <-> attn.v1.Tensor messages."""

from dataclasses import dataclass

import numpy as np

from attn.v1 import attn_pb2


@dataclass
class BFloat16:
    """A bfloat16 tensor as its raw bits (uint16, little-endian), shaped like the tensor."""

    bits: np.ndarray

    @property
    def shape(self):
        return self.bits.shape

    def to_float32(self) -> np.ndarray:
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def to_bfloat16(x) -> BFloat16:
    """Rounds float32 values to bfloat16 (nearest, ties to even; NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(bits.view(np.float32))
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded)
    return BFloat16(rounded.astype(np.uint16))


def encode(x) -> attn_pb2.Tensor:
    """A numpy float32/float16 array or a BFloat16 as a Tensor message (raw little-endian bytes)."""
    if isinstance(x, BFloat16):
        return attn_pb2.Tensor(dtype=attn_pb2.D_TYPE_BFLOAT16, shape=list(x.bits.shape),
                               data=np.ascontiguousarray(x.bits, dtype="<u2").tobytes())
    a = np.asarray(x)
    if a.dtype == np.float32:
        dtype, wire = attn_pb2.D_TYPE_FLOAT32, "<f4"
    elif a.dtype == np.float16:
        dtype, wire = attn_pb2.D_TYPE_FLOAT16, "<f2"
    else:
        raise TypeError(f"expected a float32 or float16 array or a BFloat16, got dtype {a.dtype}"
                        " (convert with .astype(np.float32) or to_bfloat16())")
    if a.ndim == 0:
        raise ValueError("expected an array of rank >= 1, got a scalar")
    return attn_pb2.Tensor(dtype=dtype, shape=list(a.shape),
                           data=np.ascontiguousarray(a, dtype=wire).tobytes())


def decode(t: attn_pb2.Tensor):
    """A Tensor message as a numpy array (float32/float16) or a BFloat16."""
    shape = tuple(t.shape)
    if len(t.values) and not t.data:  # asked for with return_values: floats, whatever the dtype
        return np.asarray(t.values, dtype=np.float32).reshape(shape)
    if t.dtype == attn_pb2.D_TYPE_FLOAT32:
        return np.frombuffer(t.data, dtype="<f4").reshape(shape).astype(np.float32)
    if t.dtype == attn_pb2.D_TYPE_FLOAT16:
        return np.frombuffer(t.data, dtype="<f2").reshape(shape).astype(np.float16)
    if t.dtype == attn_pb2.D_TYPE_BFLOAT16:
        return BFloat16(np.frombuffer(t.data, dtype="<u2").reshape(shape).copy())
    raise ValueError(f"response tensor with unknown dtype {t.dtype}")
