"""The GGUF container read from a memory map: metadata, and tensors as raw bytes.

gguf's own reader builds a numpy view per value, which takes seconds for a
vocabulary's 100k strings; this one parses the header with `struct` (about 50 ms
for SmolLM2) and leaves tensor bytes in the map until they are asked for. The
quant formats' arithmetic stays the gguf package's (`gguf.quants`).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmesh.services.common.errors import UnsupportedModelError

# GGUF value types: 0-7, 10-12 scalars, 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGML order: the fastest-varying dimension first
    type_id: int  # a GGMLQuantizationType
    offset: int  # absolute, in the file


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != b"GGUF":
            raise UnsupportedModelError(f"{self.path}: not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported")
        num_tensors, num_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        self.metadata: dict[str, object] = {}
        for _ in range(num_kv):
            key, off = self._string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            self.metadata[key], off = self._value(vtype, off + 4)
        infos = []
        for _ in range(num_tensors):
            name, off = self._string(off)
            (num_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{num_dims}Q", buf, off + 4)
            type_id, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * num_dims)
            off += 4 + 8 * num_dims + 12
            infos.append((name, dims, type_id, rel))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-off // align) * align
        self.tensors = {n: TensorInfo(n, tuple(int(d) for d in dims), t, start + rel)
                        for n, dims, t, rel in infos}

    def _string(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, off)
        return self._map[off + 8:off + 8 + n].decode("utf-8", errors="replace"), off + 8 + n

    def _value(self, vtype: int, off: int):
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, self._map, off)[0], off + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(off)
        if vtype != _ARRAY:
            raise UnsupportedModelError(f"{self.path}: unknown GGUF value type {vtype}")
        item_type, n = struct.unpack_from("<IQ", self._map, off)
        off += 12
        if item_type in _NUMPY:
            arr = np.frombuffer(self._map, dtype=_NUMPY[item_type], count=n, offset=off)
            return arr.tolist(), off + arr.nbytes
        items = []
        for _ in range(n):
            item, off = self._value(item_type, off)
            items.append(item)
        return items, off

    def raw(self, name: str) -> tuple[TensorInfo, np.ndarray]:
        """The tensor's bytes as rows of its fastest dimension: [rows, bytes per row]."""
        from gguf import GGML_QUANT_SIZES
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.type_id]
        row_bytes = info.dims[0] // block * type_size
        rows = int(np.prod(info.dims[1:], dtype=np.int64))
        data = np.frombuffer(self._map, dtype=np.uint8, count=rows * row_bytes,
                             offset=info.offset)
        return info, data.reshape(rows, row_bytes)
