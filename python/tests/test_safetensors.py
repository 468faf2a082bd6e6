"""safetensors: files from the official library loaded by gpuio, files saved by gpuio loaded by the
official library, tensor by tensor; damage; DLPack; torch and CUDA where present."""

import os
import struct

import numpy as np
import pytest

import gpuio

st_numpy = pytest.importorskip("safetensors.numpy")


def sample_tensors():
    rng = np.random.default_rng(6)
    return {
        "f32": rng.standard_normal((17, 33)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((3, 4, 5)).astype(np.float16),
        "i8": rng.integers(-128, 127, (7,), dtype=np.int8),
        "u8": rng.integers(0, 255, (2, 3), dtype=np.uint8),
        "i16": rng.integers(-1000, 1000, (9,), dtype=np.int16),
        "u16": rng.integers(0, 60000, (9,), dtype=np.uint16),
        "i32": rng.integers(-(10**9), 10**9, (4, 4), dtype=np.int32),
        "u32": rng.integers(0, 2**32 - 1, (4,), dtype=np.uint32),
        "i64": rng.integers(-(2**62), 2**62, (6,), dtype=np.int64),
        "u64": rng.integers(0, 2**63, (6,), dtype=np.uint64),
        "bool": rng.integers(0, 2, (10,)).astype(np.bool_),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "big": rng.standard_normal(3_000_000).astype(np.float32),
    }


def test_official_file_loads_identically(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors = sample_tensors()
    st_numpy.save_file(tensors, str(path), metadata={"format": "np", "who": "ref"})
    ref = st_numpy.load_file(str(path))
    got = gpuio.load_safetensors(path)
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        g = got[name]
        assert isinstance(g, np.ndarray)
        assert g.dtype == want.dtype, name
        assert g.shape == want.shape, name
        np.testing.assert_array_equal(g, want, err_msg=name)


def test_loaded_arrays_outlive_everything(tmp_path):
    path = tmp_path / "m.safetensors"
    st_numpy.save_file({"w": np.arange(1000, dtype=np.float32)}, str(path))
    w = gpuio.load_safetensors(path)["w"]
    import gc

    gc.collect()
    os.remove(path)
    np.testing.assert_array_equal(w, np.arange(1000, dtype=np.float32))
    w[0] = 5  # the one allocation is ours and writable


def test_gpuio_save_loads_in_official_library(tmp_path):
    path = tmp_path / "out.safetensors"
    tensors = sample_tensors()
    tensors["be"] = np.arange(5, dtype=">i4")  # big-endian input is stored little-endian
    tensors["strided"] = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]
    size = gpuio.save_safetensors(tensors, path, metadata={"k": "v"})
    assert size == path.stat().st_size
    ref = st_numpy.load_file(str(path))
    assert sorted(ref) == sorted(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(ref[name], want, err_msg=name)
        assert ref[name].shape == want.shape
    # and back through gpuio, with metadata
    back = gpuio.load_safetensors(path)
    for name, want in tensors.items():
        np.testing.assert_array_equal(back[name], want, err_msg=name)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}


def test_save_is_crash_safe_replacement(tmp_path):
    path = tmp_path / "m.safetensors"
    gpuio.save_safetensors({"a": np.ones(3, np.float32)}, path)
    with pytest.raises(ValueError):
        gpuio.save_safetensors({"a": np.ones(3, np.float32), "b": np.array([object()])}, path)
    np.testing.assert_array_equal(st_numpy.load_file(str(path))["a"], np.ones(3, np.float32))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary left


def test_bf16(tmp_path):
    path = tmp_path / "bf.safetensors"
    vals = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    header = b'{"x":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}'
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())
    x = gpuio.load_safetensors(path)["x"]
    try:
        import ml_dtypes  # noqa: F401

        np.testing.assert_array_equal(x.astype(np.float32), vals)
    except ImportError:
        assert x.dtype == np.uint16 and x.shape == (3,)
        np.testing.assert_array_equal(x, bits)
        restored = (x.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(restored, vals)


def test_corrupt_header_is_corrupt_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    st_numpy.save_file({"w": np.zeros(10, np.float32)}, str(path))
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[")  # the JSON no longer parses
    path.write_bytes(bytes(raw))
    with pytest.raises(gpuio.CorruptError) as e:
        gpuio.load_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(struct.pack("<Q", 1 << 40))  # header length past the file
    with pytest.raises(gpuio.CorruptError):
        gpuio.load_safetensors(path)
    path.write_bytes(b"abc")
    with pytest.raises(gpuio.CorruptError):
        gpuio.load_safetensors(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        gpuio.load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        gpuio.load_safetensors(tmp_path)
    with pytest.raises(ValueError):
        gpuio.load_safetensors(tmp_path / "x", framework="jax")


def test_from_pack_entry(tmp_path):
    m = tmp_path / "model.safetensors"
    tensors = {"a": np.arange(100_000, dtype=np.int32), "b": np.ones((3, 3))}
    st_numpy.save_file(tensors, str(m))
    pk = tmp_path / "models.gpk"
    gpuio.pack([m], pk, codec="zstd")
    got = gpuio.load_safetensors(f"{pk}:model.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)


def test_dlpack_export_to_numpy(tmp_path):
    path = tmp_path / "d.safetensors"
    tensors = {"f": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "i": np.arange(5, dtype=np.int64)}
    st_numpy.save_file(tensors, str(path))
    dl = gpuio.load_safetensors(path, framework="dlpack")
    for name, want in tensors.items():
        t = dl[name]
        assert t.__dlpack_device__() == (1, 0)
        assert (t.shape, t.device, t.nbytes) == (list(want.shape), "cpu", want.nbytes)
        got = np.from_dlpack(t)
        np.testing.assert_array_equal(got, want)
        # legacy (unversioned) and versioned capsules both
        assert "dltensor" in repr(t.__dlpack__())
        assert "dltensor_versioned" in repr(t.__dlpack__(max_version=(1, 0)))
    del dl
    import gc

    gc.collect()
    np.testing.assert_array_equal(got, tensors["i"])  # the view keeps the allocation alive


def test_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    path = tmp_path / "t.safetensors"
    st_numpy.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(path))
    got = gpuio.load_safetensors(path, framework="torch")
    assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def _cuda_reason():
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    return None


def test_cuda_load_matches_safetensors(tmp_path):
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "c.safetensors"
    st_numpy.save_file(sample_tensors(), str(path))
    ref = load_file(str(path), device="cuda:0")
    got = gpuio.load_safetensors(path, device="cuda:0", framework="torch")
    for k, v in ref.items():
        assert got[k].device.type == "cuda"
        assert torch.equal(got[k], v), k


def test_cuda_memory_lives_with_the_views_and_is_freed_with_the_last(tmp_path):
    """Each load's one device allocation stays while any view of it lives and is given back when the
    last dies: ten loads leave the free memory where it was after the first (which pays one-time
    costs: contexts, code loaded)."""
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    import gc

    import torch

    path = tmp_path / "m.safetensors"
    nbytes = 64 << 20
    st_numpy.save_file({f"w{i}": np.ones(nbytes // 16, np.float32) for i in range(4)}, str(path))

    def settle():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    m = gpuio.load_safetensors(path, device="cuda:0", framework="torch")
    del m
    free0 = settle()
    for _ in range(10):
        m = gpuio.load_safetensors(path, device="cuda:0", framework="torch")
        views = [t[:1] for t in m.values()]
        del m
        held = free0 - settle()
        assert held >= nbytes, f"{held} bytes held while views live, the model is {nbytes}"
        del views
    leaked = free0 - settle()
    assert leaked < (8 << 20), f"{leaked} bytes not given back after 10 loads"


def test_cuda_without_driver_names_what_is_missing(tmp_path):
    if _cuda_reason() is None:
        pytest.skip("a CUDA device is present")
    path = tmp_path / "c.safetensors"
    st_numpy.save_file({"w": np.zeros(4, np.float32)}, str(path))
    try:
        gpuio.load_safetensors(path, device="cuda:0", framework="dlpack")
    except gpuio.UnsupportedError as e:
        assert str(e)
    else:  # a driver and GPU are there even though torch cannot see them
        pass
