"""Packs: gpuio.pack → gpuio.Pack round trips against the original bytes; verify; damage."""

import numpy as np
import pytest

import gpuio


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    (src / "layers").mkdir(parents=True)
    files = {
        "a.bin": rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes(),  # incompressible
        "layers/0.bin": b"0123456789abcdef" * 50_000,  # compressible
        "layers/empty": b"",
        "small.txt": b"hello pack\n",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src, files


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_round_trip(tmp_path, tree, codec):
    src, files = tree
    out = tmp_path / f"t-{codec}.gpk"
    summary = gpuio.pack([src], out, codec=codec, chunk_size=16384)
    assert summary["entries"] == len(files)
    assert summary["logical_bytes"] == sum(len(v) for v in files.values())
    assert summary["file_bytes"] == out.stat().st_size
    p = gpuio.Pack(out)
    assert sorted(p.names()) == sorted(files)
    assert len(p) == len(files) and "small.txt" in p and "nope" not in p
    for e in p.entries:
        assert e.size == len(files[e.name])
        assert e.codec == codec
        assert e.chunk_size == 16384
        whole = e.read()
        assert isinstance(whole, np.ndarray) and whole.dtype == np.uint8
        assert whole.tobytes() == files[e.name]
    e = p.entry("layers/0.bin")
    data = files["layers/0.bin"]
    for off, n in [(0, 1), (16383, 2), (100_000, 70_000), (len(data) - 5, None), (len(data) - 5, 100)]:
        got = e.read(off, n).tobytes()
        assert got == data[off:] if n is None else got == data[off:off + n]
    buf = bytearray(5000)
    assert e.pread(buf, 12_345) == 5000 and bytes(buf) == data[12_345:17_345]
    assert p.verify() == []
    if codec != "none":
        assert p.entry("layers/0.bin").stored_bytes < len(data)


def test_pack_single_file_and_errors(tmp_path, tree):
    src, files = tree
    out = tmp_path / "one.gpk"
    gpuio.pack(src / "small.txt", out)
    p = gpuio.Pack(out)
    assert p.names() == ["small.txt"] and p["small.txt"].read().tobytes() == files["small.txt"]
    with pytest.raises(KeyError):
        p.entry("missing")
    with pytest.raises(ValueError):
        gpuio.pack([src], tmp_path / "x.gpk", codec="rar")
    with pytest.raises(ValueError):
        p["small.txt"].read(1000)
    with pytest.raises(gpuio.UnexpectedEofError):
        p["small.txt"].pread(bytearray(100), 0)
    with pytest.raises(FileNotFoundError):
        gpuio.pack([tmp_path / "nope"], tmp_path / "y.gpk")
    with pytest.raises(FileNotFoundError):
        gpuio.Pack(tmp_path / "nope.gpk")


def test_damage_is_reported(tmp_path, tree):
    src, files = tree
    out = tmp_path / "d.gpk"
    gpuio.pack([src / "a.bin"], out, codec="zstd", chunk_size=16384)
    raw = bytearray(out.read_bytes())
    # A byte in the middle of the payload (not the header/table at the start or end).
    raw[len(raw) // 2] ^= 0xFF
    out.write_bytes(bytes(raw))
    p = gpuio.Pack(out)
    problems = p.verify()
    assert problems and all(isinstance(s, str) and "\n" not in s for s in problems)
    with pytest.raises(gpuio.CorruptError) as e:
        p.entry("a.bin").read()
    assert str(e.value).strip() == str(e.value) and str(out) in str(e.value)
    # A damaged table fails at open.
    raw = bytearray(out.read_bytes())
    raw[:8] = b"notapack"
    out.write_bytes(bytes(raw))
    with pytest.raises(gpuio.Error):
        gpuio.Pack(out)
