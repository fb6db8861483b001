"""A small, fast reader of GGUF files (llama.cpp's single-file model format).

The `gguf` package's `GGUFReader` builds a numpy view per array element while parsing, which
takes ~15 s for Gemma 3's 262k-token vocabulary; this reader parses the header with `struct`
and numpy in well under a second, memory-maps the tensor data, and leaves dequantisation to
`gguf.quants.dequantize` (the `gguf` package is needed only for quantised tensors).

Layout (GGUF v2/v3, little-endian): magic b"GGUF", version u32, tensor count u64, metadata
count u64; metadata entries (key string, value type u32, value); tensor infos (name, n_dims
u32, dims u64[n_dims] innermost first, ggml type u32, offset u64); padding to
`general.alignment` (default 32); tensor data. A tensor's numpy shape is its dims reversed, so
a linear weight reads as `[out, in]`, as in PyTorch.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# ggml types read without the gguf package: type id -> numpy dtype name.
_PLAIN = {0: "float32", 1: "float16", 30: "bfloat16", 28: "float64"}
_ITEMSIZE = {0: 4, 1: 2, 30: 2, 28: 8}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml dims reversed)
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            import gguf

            return gguf.GGMLQuantizationType(self.ggml_type).name
        except Exception:  # noqa: BLE001 - unknown ids or no gguf package
            names = {0: "F32", 1: "F16", 30: "BF16", 28: "F64"}
            return names.get(self.ggml_type, f"type{self.ggml_type}")


class GGUFFile:
    """Metadata and tensors of one GGUF file."""

    def __init__(self, path: str):
        """Reads the header; a file that is not GGUF, or is cut short (in its header or its
        tensor data), raises ValueError naming the file."""
        self.path = path
        if os.path.getsize(path) < 24:
            raise ValueError(f"{path}: not a GGUF file, or a truncated one: "
                             f"{os.path.getsize(path)} bytes, shorter than a GGUF header")
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(self._data)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        try:
            self._read_header(buf)
        except struct.error:
            raise ValueError(f"{path}: truncated GGUF file: its header (metadata and tensor "
                             f"list) runs past the end of the file ({len(buf)} bytes)") from None
        end = max((t.offset + t.nbytes for t in self.tensors.values()), default=0)
        if end > len(buf):
            last = max(self.tensors.values(), key=lambda t: t.offset + t.nbytes)
            raise ValueError(f"{path}: truncated GGUF file: tensor {last.name!r} ends at byte "
                             f"{end}, the file has {len(buf)} bytes")

    def _read_header(self, buf) -> None:
        path = self.path
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        self.version = version
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            value, pos = self._value(buf, pos + 4, vtype)
            self.metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(buf, pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            nbytes = _nbytes(shape, ggml_type, name)
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start + offset, nbytes)

    @staticmethod
    def _string(buf, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise struct.error(f"a string of {n} bytes at byte {pos} runs past the end")
        return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, buf, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return self._string(buf, pos)
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                if pos + count * dtype.itemsize > len(buf):
                    raise struct.error(f"an array of {count} values at byte {pos} runs past "
                                       f"the end")
                arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).copy()
                return arr.tolist(), pos + count * dtype.itemsize
            out = []
            for _ in range(count):
                value, pos = self._value(buf, pos, etype)
                out.append(value)
            return out, pos
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {pos}")

    def raw(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self._data[info.offset: info.offset + info.nbytes]

    def load(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy order, dequantised if needed."""
        if name not in self.tensors:
            raise ValueError(f"{self.path}: missing tensor {name!r}")
        info = self.tensors[name]
        raw = self.raw(name)
        if info.ggml_type in _PLAIN:
            kind = _PLAIN[info.ggml_type]
            if kind == "bfloat16":
                import ml_dtypes

                dtype = np.dtype(ml_dtypes.bfloat16)
            else:
                dtype = np.dtype(kind)
            return raw.view(dtype).reshape(info.shape).astype(np.float32)
        try:
            import gguf
            from gguf import quants
        except ImportError as e:
            raise ValueError(f"{self.path}: tensor {name!r} is quantised ({info.type_name}); "
                             f"dequantising needs the gguf package (pip install gguf)") from e
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = info.shape[:-1] + (info.shape[-1] // block * type_size,)
        try:
            out = quants.dequantize(raw.reshape(byte_shape), qtype)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {name!r} uses quantisation {info.type_name}, "
                             f"which gguf.quants cannot dequantise ({e})") from e
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


def _nbytes(shape: tuple[int, ...], ggml_type: int, name: str) -> int:
    count = int(np.prod(shape)) if shape else 1
    if ggml_type in _PLAIN:
        return count * _ITEMSIZE[ggml_type]
    try:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except ImportError as e:
        raise ValueError(f"tensor {name!r} is quantised (ggml type {ggml_type}); reading it "
                         f"needs the gguf package (pip install gguf)") from e
    except (ValueError, KeyError) as e:
        raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from e
    if shape[-1] % block:
        raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                         f"block size {block} of its quantisation")
    return count // block * type_size
