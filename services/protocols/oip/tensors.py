"""Open Inference Protocol v2 tensors, shared by its REST and gRPC translations: decoding the wire's
datatypes into numpy (or a list of bytes for BYTES), and back."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.functions.types import Refused

DTYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def bad_tensor(message: str) -> Refused:
    """A tensor the caller got wrong: the message names the tensor and the problem."""
    return Refused("invalid", message)


MAX_DIMENSIONS = 64  # numpy 2's; tests/test_oip.py fails if numpy's changes


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    """numpy in the tensor's shape, or for BYTES the elements in row-major order"""

    @property
    def count(self) -> int:
        return len(self.data) if isinstance(self.data, list) else int(self.data.size)


def check_header(name: str, datatype: str, shape: list[int]) -> int:
    """The element count the shape gives; refuses unknown datatypes, shapes of more dimensions than
    numpy holds (before their product, which for a body of millions of them took the event loop for
    minutes), and negative dimensions."""
    if datatype != "BYTES" and datatype not in DTYPES:
        raise bad_tensor(f"input '{name}': unknown datatype {datatype!r}")
    if len(shape) > MAX_DIMENSIONS:
        raise bad_tensor(
            f"input '{name}': a shape of {len(shape)} dimensions cannot be held (at most {MAX_DIMENSIONS})"
        )
    if any(dim < 0 for dim in shape):
        raise bad_tensor(f"input '{name}': shape {shape} has a negative dimension")
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes (gRPC raw_input_contents, or REST's binary tensor extension); BYTES
    elements are each a 4-byte little-endian length and the bytes."""
    count = check_header(name, datatype, shape)
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise bad_tensor(f"input '{name}': BYTES data ends inside an element's length")
            (size,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + size > len(raw):
                raise bad_tensor(f"input '{name}': BYTES element {len(items)} runs past the end of the data")
            items.append(raw[offset : offset + size])
            offset += size
        if len(items) != count:
            raise bad_tensor(
                f"input '{name}': shape {shape} needs {count} elements, the data has {len(items)}"
            )
        return Tensor(name, datatype, shape, items)
    dtype = np.dtype(DTYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise bad_tensor(
            f"input '{name}': {datatype} of shape {shape} is {count * dtype.itemsize} bytes, not {len(raw)}"
        )
    return Tensor(name, datatype, shape, shaped(name, np.frombuffer(raw, dtype=dtype), shape))


def from_values(name: str, datatype: str, shape: list[int], values: list[Any]) -> Tensor:
    """A tensor from typed values (gRPC contents, or REST JSON `data`, flat or nested)."""
    count = check_header(name, datatype, shape)
    flat = list(flatten(values))
    if len(flat) != count:
        raise bad_tensor(f"input '{name}': shape {shape} needs {count} elements, the data has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str | bytes) for v in flat):
            raise bad_tensor(f"input '{name}': BYTES elements must be strings")
        return Tensor(name, datatype, shape, [v.encode() if isinstance(v, str) else v for v in flat])
    wanted = bool if datatype == "BOOL" else float if datatype.startswith("FP") else int
    if not all(isinstance(v, wanted) or (wanted is float and isinstance(v, int)) for v in flat):
        raise bad_tensor(f"input '{name}': {datatype} elements must be {wanted.__name__} values")
    if wanted is not bool and any(isinstance(v, bool) for v in flat):
        raise bad_tensor(f"input '{name}': {datatype} elements must be {wanted.__name__} values")
    try:
        array = np.array(flat, dtype=np.dtype(DTYPES[datatype]))
    except OverflowError as exc:
        raise bad_tensor(f"input '{name}': a value is out of range for {datatype}") from exc
    return Tensor(name, datatype, shape, shaped(name, array, shape))


def shaped(name: str, array: np.ndarray, shape: list[int]) -> np.ndarray:
    """numpy refuses some shapes whose element count matches, such as [0, 10**20] (a dimension past
    its index range) or more than 64 dimensions: the caller's fault, said as such."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise bad_tensor(f"input '{name}': shape {shape} cannot be held: {exc}") from None


def flatten(values: Any) -> Any:
    for value in values if isinstance(values, list) else [values]:
        if isinstance(value, list):
            yield from flatten(value)
        else:
            yield value


def to_raw(tensor: Tensor) -> bytes:
    if isinstance(tensor.data, list):
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=np.dtype(DTYPES[tensor.datatype])).tobytes()


def to_values(tensor: Tensor) -> list[Any]:
    """Flat row-major values for JSON; BYTES as text."""
    if isinstance(tensor.data, list):
        return [item.decode("utf-8", errors="replace") for item in tensor.data]
    return tensor.data.reshape(-1).tolist()


def bytes_tensor(name: str, *items: str) -> Tensor:
    return Tensor(name, "BYTES", [len(items)], [item.encode() for item in items])


def scalar(name: str, datatype: str, value: float | int | bool) -> Tensor:
    return Tensor(name, datatype, [1], np.array([value], dtype=np.dtype(DTYPES[datatype])))
