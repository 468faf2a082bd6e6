"""gpuio.stream: each slot through a Python function, against the same transform in numpy."""

import numpy as np
import pytest

import gpuio


def test_stream_transforms_into_output(big_file, tmp_path):
    path, data = big_file
    out = tmp_path / "out.bin"
    seen = []

    def fn(view):
        assert view.dtype == np.uint8
        seen.append(len(view))
        np.bitwise_xor(view, 0x5A, out=view)

    stats = gpuio.stream(path, out, fn, slots=3, chunk_size=3 << 20)
    expect = np.bitwise_xor(np.frombuffer(data, np.uint8), 0x5A).tobytes()
    assert out.read_bytes() == expect
    assert sum(seen) == len(data) and max(seen) == 3 << 20
    assert stats["bytes_in"] == len(data) == stats["bytes_out"]
    assert stats["chunks"] == len(seen)
    assert set(stats["stages"]) == {"read", "compute", "write"}
    assert 0 <= stats["overlap_efficiency"] <= 1


def test_stream_without_output_is_a_consumer(data_file):
    path, data = data_file
    total = [0]

    def fn(view):
        total[0] += int(view.sum(dtype=np.uint64))

    stats = gpuio.stream(path, None, fn, slots=2, chunk_size=1 << 20)
    assert total[0] == int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64))
    assert "write" not in stats["stages"] and stats["bytes_out"] == 0


def test_stream_copy_without_fn(data_file, tmp_path):
    path, data = data_file
    out = tmp_path / "copy.bin"
    gpuio.stream(path, out, slots=1, chunk_size=4096 * 3 + 1)
    assert out.read_bytes() == data


def test_stream_error_in_fn_keeps_old_output(data_file, tmp_path):
    path, _ = data_file
    out = tmp_path / "keep.bin"
    out.write_bytes(b"old")

    class Boom(Exception):
        pass

    calls = [0]

    def fn(view):
        calls[0] += 1
        if calls[0] == 2:
            raise Boom("stop here")

    with pytest.raises(Boom, match="stop here"):
        gpuio.stream(path, out, fn, chunk_size=1 << 20)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "keep.bin"]


def test_stream_pack_entry(data_file, tmp_path):
    path, data = data_file
    pk = tmp_path / "p.gpk"
    gpuio.pack([path], pk, codec="lz4")
    out = tmp_path / "o.bin"
    gpuio.stream(f"{pk}:data.bin", out)
    assert out.read_bytes() == data


def test_stream_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        gpuio.stream(tmp_path / "missing", None)
    with pytest.raises(ValueError):
        gpuio.stream(tmp_path / "missing", None, slots=0)
