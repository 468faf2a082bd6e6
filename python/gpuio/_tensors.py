"""safetensors for gpu-io: dtype mapping and the Python side of ``load_safetensors`` /
``save_safetensors``.

numpy has no bfloat16 or float8 types. Where the ``ml_dtypes`` package is installed its types are
used (``ml_dtypes.bfloat16``, ``float8_e4m3fn``, ``float8_e5m2``, ``float8_e8m0fnu``); otherwise such
tensors are returned as same-shape views of their raw bits (``uint16`` for BF16, ``uint8`` for the
float8 types), which ``torch.from_numpy(a).view(torch.bfloat16)`` turns into a real tensor. Sub-byte
types (F4, F6_*) are returned as flat ``uint8`` arrays of their packed bytes.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from . import _gpuio

try:  # optional: numpy types for bfloat16 and float8
    import ml_dtypes as _ml  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _ml = None

_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "C64": np.dtype("<c8"),
}

# Raw-bit stand-ins when ml_dtypes is absent.
_RAW = {"BF16": np.dtype("<u2"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"), "F8_E8M0": np.dtype("u1")}
_ML_NAMES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


def numpy_dtype(name: str) -> Optional[np.dtype]:
    """The numpy dtype gpu-io returns for safetensors dtype ``name`` (None for sub-byte types)."""
    if name in _NUMPY:
        return _NUMPY[name]
    if name in _RAW:
        if _ml is not None and hasattr(_ml, _ML_NAMES[name]):
            return np.dtype(getattr(_ml, _ML_NAMES[name]))
        return _RAW[name]
    return None


def safetensors_dtype(dt: np.dtype) -> str:
    """The safetensors dtype name for a numpy dtype (ValueError if there is none)."""
    dt = np.dtype(dt)
    for name, d in _NUMPY.items():
        if d == dt or (dt.byteorder == ">" and d == dt.newbyteorder("<")):
            return name
    if _ml is not None:
        for name, ml in _ML_NAMES.items():
            if hasattr(_ml, ml) and dt == np.dtype(getattr(_ml, ml)):
                return name
    raise ValueError(f"numpy dtype {dt} has no safetensors equivalent")


def _torch_from_numpy(arr: np.ndarray, st_dtype: str) -> Any:
    import torch  # type: ignore[import-not-found]

    special = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
    if st_dtype in special:
        raw = arr.view(_RAW[st_dtype])
        return torch.from_numpy(raw).view(getattr(torch, special[st_dtype]))
    return torch.from_numpy(arr)


def load_safetensors(
    path: Union[str, "os.PathLike[str]"],
    device: str = "cpu",
    framework: str = "numpy",
) -> Dict[str, Any]:
    """Loads every tensor of a safetensors file (or ``"PACK:ENTRY"``) in one allocation on ``device``.

    ``device="cpu"`` loads into host memory through gpu-io's staged path; ``"cuda:N"`` into GPU
    memory (needs an NVIDIA driver; raises ``gpuio.UnsupportedError`` saying what is missing where
    there is none). ``framework="numpy"`` (host only) returns numpy arrays — views of the one
    allocation, freed when the last of them is gone; see this module's docs for bfloat16/float8.
    ``framework="torch"`` returns torch tensors (zero-copy: ``torch.from_numpy`` on the host,
    ``torch.from_dlpack`` on a GPU). ``framework="dlpack"`` returns ``gpuio.Tensor`` objects that any
    DLPack consumer (``torch.from_dlpack``, ``cupy.from_dlpack``, ``numpy.from_dlpack``) takes
    without a copy. The header is validated completely before anything is allocated; a damaged file
    raises ``gpuio.CorruptError``.
    """
    if framework not in ("numpy", "torch", "dlpack"):
        raise ValueError(f"framework={framework!r} is not one of 'numpy', 'torch', 'dlpack'")
    model = _gpuio._load_safetensors(os.fspath(path), device)
    out: Dict[str, Any] = {}
    host = model.device == "cpu"
    if framework == "numpy" and not host:
        raise ValueError(
            f"framework='numpy' needs device='cpu' (the tensors are in {model.device} memory): "
            "use framework='torch' or 'dlpack'"
        )
    for i, (name, dtype, shape, nbytes) in enumerate(model.table()):
        if framework == "dlpack" or (framework == "torch" and not host):
            t = model.tensor(i)
            if framework == "torch":
                import torch  # type: ignore[import-not-found]

                out[name] = torch.from_dlpack(t)
            else:
                out[name] = t
            continue
        raw = model.host_bytes(i)
        dt = numpy_dtype(dtype)
        arr = raw if dt is None else raw.view(dt).reshape(tuple(shape))
        out[name] = _torch_from_numpy(arr, dtype) if framework == "torch" else arr
    return out


def save_safetensors(
    tensors: Mapping[str, Any],
    path: Union[str, "os.PathLike[str]"],
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """Writes ``tensors`` (name → numpy array, or anything ``numpy.asarray`` takes; torch CPU
    tensors too) as a safetensors file at ``path``, crash-safely: the file is written beside ``path``
    under a temporary name, fsynced, renamed over ``path`` and the directory fsynced, so a crash
    leaves the old file or the new one, never a mix. Tensors are laid out in the order given.
    ``metadata``: str → str, stored as the header's ``__metadata__``. Returns the file's size.
    The official ``safetensors`` library loads the result."""
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__}")
        st = None
        if hasattr(value, "detach") and hasattr(value, "dtype") and "torch" in type(value).__module__:
            import torch  # type: ignore[import-not-found]

            tdt = {torch.bfloat16: "BF16"}.get(value.dtype)
            if tdt is not None:
                st = tdt
                value = value.detach().cpu().contiguous().view(torch.int16).numpy()
            else:
                value = value.detach().cpu().contiguous().numpy()
        arr = np.asarray(value)
        if st is None:
            st = safetensors_dtype(arr.dtype)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        shape = [int(s) for s in arr.shape]  # before ascontiguousarray, which makes 0-d arrays 1-d
        arr = np.ascontiguousarray(arr)
        items.append((name, st, shape, arr.reshape(-1).view(np.uint8)))
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    return _gpuio._save_safetensors(items, os.fspath(path), meta)
