"""numpy arrays inside pydantic messages: dtype, shape and raw little-endian bytes."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, field_validator

_ALLOWED = {"<f8", "<i8", "<i4", "|u1"}


class NDArray(BaseModel):
    dtype: str
    shape: list[int]
    data: bytes

    @field_validator("dtype")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in _ALLOWED:
            raise ValueError(f"unsupported dtype {value}")
        return value

    @classmethod
    def of(cls, array: np.ndarray) -> NDArray:
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        array = array.astype(dtype, copy=False)
        return cls(dtype=dtype.str, shape=list(array.shape), data=array.tobytes())

    def array(self) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=np.dtype(self.dtype))
        expected = int(np.prod(self.shape)) if self.shape else 1
        if out.size != expected:
            raise ValueError(
                f"array data holds {out.size} items, shape {self.shape} needs {expected}"
            )
        return out.reshape(self.shape).copy()
