"""PageCache / CachedArray: gathers against numpy memmap fancy indexing on the same file."""

import numpy as np
import pytest

import gpuio


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(7)
    t = rng.standard_normal((5000, 24)).astype(np.float32)  # 96-byte rows: rows straddle lines
    path = tmp_path / "emb.bin"
    header = b"H" * 100
    path.write_bytes(header + t.tobytes())
    return path, t, len(header)


def test_gather_matches_memmap(table):
    path, t, off = table
    mm = np.memmap(path, dtype=np.float32, mode="r", offset=off, shape=t.shape)
    cache = gpuio.PageCache(size=128 << 10, line=4096)  # smaller than the table: evictions
    a = cache.array(path, np.float32, (-1, 24), offset=off)
    assert a.shape == t.shape and len(a) == 5000
    rng = np.random.default_rng(8)
    for _ in range(20):
        idx = rng.integers(0, 5000, 256)
        np.testing.assert_array_equal(a[idx], mm[idx])
    idx2 = rng.integers(-5000, 5000, (8, 16))
    np.testing.assert_array_equal(a[idx2], mm[idx2])
    np.testing.assert_array_equal(a[[3, 3, 3]], mm[[3, 3, 3]])
    np.testing.assert_array_equal(a[np.array([], dtype=np.int64)], mm[np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(a[7], mm[7])
    np.testing.assert_array_equal(a[-1], mm[-1])
    np.testing.assert_array_equal(a[10:400], mm[10:400])
    np.testing.assert_array_equal(a[10:400:7], mm[10:400:7])
    np.testing.assert_array_equal(a[idx, 3], mm[idx, 3])
    np.testing.assert_array_equal(a[5, 2:9], mm[5, 2:9])
    mask = rng.integers(0, 2, 5000).astype(bool)
    np.testing.assert_array_equal(a[mask], mm[mask])
    s = cache.stats()
    assert s["misses"] > 0 and s["evictions"] > 0 and s["bytes_read"] > 0
    assert 0.0 <= s["hit_rate"] <= 1.0


def test_index_errors(table):
    path, t, off = table
    a = gpuio.PageCache(size=1 << 20).array(path, "f4", (5000, 24), offset=off)
    with pytest.raises(IndexError):
        a[5000]
    with pytest.raises(IndexError):
        a[[0, 5000]]
    with pytest.raises(IndexError):
        a[np.array([0.5])]
    with pytest.raises(ValueError):
        gpuio.PageCache(size=1 << 20).array(path, "f4", (6000, 24), offset=off)
    with pytest.raises(gpuio.InvalidInputError):
        gpuio.PageCache(size=1 << 20, line=1000)
    with pytest.raises(FileNotFoundError):
        gpuio.PageCache(size=1 << 20).array(path.parent / "nope", "f4")


def test_prefetch_then_hits(table):
    path, t, off = table
    cache = gpuio.PageCache(size=4 << 20, line=4096)
    a = cache.array(path, np.float32, (5000, 24), offset=off)
    rows = np.arange(100, 300)
    a.prefetch(rows, wait=True)
    cache.reset_stats()
    np.testing.assert_array_equal(a[rows], t[rows])
    s = cache.stats()
    assert s["misses"] == 0 and s["hits"] > 0


def test_one_dimensional_and_writes(tmp_path):
    path = tmp_path / "v.bin"
    v = np.arange(100_000, dtype=np.int64)
    path.write_bytes(v.tobytes())
    cache = gpuio.PageCache(size=256 << 10, line=512)
    a = cache.array(path, np.int64, writable=True)
    assert a.shape == (100_000,)
    idx = np.array([99_999, 0, 4242])
    np.testing.assert_array_equal(a[idx], v[idx])
    a[[1, 2]] = [-1, -2]
    a[10] = 77
    np.testing.assert_array_equal(a[[1, 2, 10]], [-1, -2, 77])
    a.flush()
    on_disk = np.fromfile(path, dtype=np.int64)
    assert on_disk[1] == -1 and on_disk[2] == -2 and on_disk[10] == 77
    ro = gpuio.PageCache(size=1 << 20).array(path, np.int64)
    with pytest.raises(PermissionError):
        ro[0] = 1
