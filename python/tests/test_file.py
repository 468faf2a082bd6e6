"""gpuio.open / File: every read and write path against plain Python file I/O."""

import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest

import gpuio
from conftest import wait_released


def test_pread_matches_python_reads(data_file):
    path, data = data_file
    with gpuio.open(path) as f:
        assert f.size == len(data)
        for off, n in [(0, 1), (0, 4096), (1, 4095), (4095, 3), (12345, 1 << 20), (len(data) - 10, 10)]:
            buf = bytearray(n)
            assert f.pread(buf, off) == n
            assert bytes(buf) == data[off:off + n]


def test_pread_into_many_buffer_types(data_file):
    path, data = data_file
    with gpuio.open(path) as f:
        arr = np.zeros(1000, dtype=np.uint8)
        assert f.pread(arr, 7) == 1000 and arr.tobytes() == data[7:1007]
        f32 = np.zeros(250, dtype=np.float32)  # any C-contiguous dtype: bytes
        assert f.pread(f32, 8) == 1000 and f32.tobytes() == data[8:1008]
        ba = bytearray(300)
        mv = memoryview(ba)[100:200]
        assert f.pread(mv, 5) == 100 and bytes(ba[100:200]) == data[5:105]
        assert ba[:100] == bytearray(100)


def test_pread_at_end_of_file_is_short(data_file):
    path, data = data_file
    with gpuio.open(path) as f:
        buf = bytearray(1000)
        assert f.pread(buf, len(data) - 10) == 10
        assert bytes(buf[:10]) == data[-10:]
        assert f.pread(bytearray(10), len(data) + 100) == 0


def test_large_pread_in_pieces(big_file):
    path, data = big_file
    with gpuio.open(path) as f:
        out = np.empty(len(data) - 3, dtype=np.uint8)
        assert f.pread(out, 3) == len(data) - 3
        assert out.tobytes() == data[3:]
        out = np.empty(len(data), dtype=np.uint8)
        assert f.pread(out, 4096) == len(data) - 4096  # short at end of file
        assert out[: len(data) - 4096].tobytes() == data[4096:]


def test_read_returns_numpy(data_file):
    path, data = data_file
    with gpuio.open(path) as f:
        a = f.read(100, 5000)
        assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (5000,)
        assert a.tobytes() == data[100:5100]
        a[0] = 1  # writable, owned by the array
        b = f.read(len(data) - 7, 100)
        assert b.tobytes() == data[-7:]


def test_pread_refuses_readonly_buffer(data_file):
    path, _ = data_file
    with gpuio.open(path) as f:
        with pytest.raises(BufferError):
            f.pread(b"immutable", 0)
        with pytest.raises(TypeError):
            f.pread(12, 0)
        with pytest.raises(ValueError):
            f.pread(bytearray(1), -1)


def test_pwrite_then_read_back(tmp_path):
    path = tmp_path / "w.bin"
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, 100_000, dtype=np.uint8)
    with gpuio.open(path, "w") as f:
        assert f.pwrite(a, 0) == len(a)
        assert f.pwrite(b"hello", 3) == 5
        big = rng.integers(0, 256, (20 << 20) + 5, dtype=np.uint8)
        assert f.pwrite(big, 100_000) == len(big)
        f.sync()
        assert f.size == 100_000 + len(big)
    expect = bytearray(a.tobytes())
    expect[3:8] = b"hello"
    got = path.read_bytes()
    assert got[:100_000] == bytes(expect)
    assert got[100_000:] == big.tobytes()


def test_write_to_readonly_file_is_permission_error(data_file):
    path, _ = data_file
    with gpuio.open(path, "r") as f:
        with pytest.raises(PermissionError) as e:
            f.pwrite(b"x", 0)
        assert isinstance(e.value, gpuio.Error)


def test_modes_and_direct(tmp_path, data_file):
    path, data = data_file
    with gpuio.open(path, "r+", direct="off") as f:
        assert not f.is_direct and f.direct_reason
        f.pwrite(b"abc", 0)
    assert path.read_bytes()[:3] == b"abc"
    with pytest.raises(ValueError):
        gpuio.open(path, "a")
    with pytest.raises(ValueError):
        gpuio.open(path, direct="maybe")


def test_closed_file(data_file):
    path, _ = data_file
    f = gpuio.open(path)
    assert not f.closed
    f.close()
    f.close()
    assert f.closed
    with pytest.raises(ValueError, match="closed file"):
        f.pread(bytearray(1), 0)


def test_batch(data_file):
    path, data = data_file
    rng = np.random.default_rng(4)
    offs = rng.integers(0, len(data) - 4096, 200)
    bufs = [bytearray(4096) for _ in offs]
    with gpuio.open(path) as f:
        got = f.pread_batch(list(zip(bufs, offs.tolist())))
        assert got == [4096] * len(offs)
        for b, o in zip(bufs, offs):
            assert bytes(b) == data[o:o + 4096]
        tail = bytearray(100)
        assert f.pread_batch([(tail, len(data) - 30), (bytearray(8), len(data) + 5)]) == [30, 0]
        assert bytes(tail[:30]) == data[-30:]


def test_queue_options(data_file):
    path, data = data_file
    for prio in ("high", "normal", "low"):
        for kind in ("concurrent", "serial"):
            q = gpuio.Queue(priority=prio, kind=kind)
            assert (q.priority, q.kind) == (prio, kind)
            with gpuio.open(path) as f:
                buf = bytearray(777)
                assert f.pread(buf, 3, queue=q) == 777 and bytes(buf) == data[3:780]
                fut = f.read_async(0, 10, queue=q)
                assert fut.result().tobytes() == data[:10]
            assert q.stats()["bytes_read"] >= 777
    with pytest.raises(ValueError):
        gpuio.Queue(priority="urgent")


def test_async_variants(data_file, tmp_path):
    path, data = data_file
    with gpuio.open(path) as f:
        bufs = [bytearray(4096) for _ in range(64)]
        futs = [f.pread_async(b, i * 4096) for i, b in enumerate(bufs)]
        assert [fu.result(timeout=30) for fu in futs] == [4096] * 64
        assert all(fu.done() and not fu.cancelled() for fu in futs)
        for i, b in enumerate(bufs):
            assert bytes(b) == data[i * 4096:(i + 1) * 4096]
        r = f.read_async(5, 100)
        assert r.result().tobytes() == data[5:105]
        assert r.result() is r.result()  # converted once
        assert r.exception() is None
        assert r.cancel() is False  # already done
    out = tmp_path / "o.bin"
    with gpuio.open(out, "w") as g:
        assert g.pwrite_async(b"0123456789", 2).result() == 10
    assert out.read_bytes() == b"\0\0" + b"0123456789"


def test_async_large_goes_through_pieces(big_file):
    path, data = big_file
    with gpuio.open(path) as f:
        out = np.empty(len(data), dtype=np.uint8)
        assert f.pread_async(out, 0).result(timeout=60) == len(data)
        assert out.tobytes() == data
        assert f.read_async(1, len(data)).result().tobytes() == data[1:]


def test_async_error_and_callback(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(b"x" * 10)
    seen = []
    done = threading.Event()
    with gpuio.open(path) as f:
        fut = f.read_async(0, 10)
        fut.add_done_callback(lambda fu: (seen.append(fu.result().tobytes()), done.set()))
        assert done.wait(30)
    assert seen == [b"x" * 10]


def test_cancel_runs_to_a_final_state(big_file):
    path, _ = big_file
    with gpuio.open(path) as f:
        futs = [f.read_async(i * 4096, 1 << 20) for i in range(32)]
        cancelled = [fu.cancel() for fu in futs]
        for fu, c in zip(futs, cancelled):
            exc = fu.exception(timeout=30)
            if fu.cancelled():
                assert c and isinstance(exc, gpuio.CancelledError)
            else:
                assert exc is None
        big = f.pread_async(np.empty(len(path.read_bytes()), np.uint8), 0)
        if big.cancel():
            with pytest.raises(gpuio.CancelledError):
                big.result(timeout=60)


def test_asyncio_await(data_file):
    path, data = data_file

    async def main():
        with gpuio.open(path) as f:
            bufs = [bytearray(1000) for _ in range(20)]
            got = await asyncio.gather(*(f.pread_async(b, i * 1000) for i, b in enumerate(bufs)))
            arr = await f.read_async(10, 20)
            return got, bufs, arr

    got, bufs, arr = asyncio.run(main())
    assert got == [1000] * 20
    assert all(bytes(b) == data[i * 1000:(i + 1) * 1000] for i, b in enumerate(bufs))
    assert arr.tobytes() == data[10:30]


def test_asyncio_await_error(tmp_path):
    async def main(f):
        return await f.pread_async(bytearray(5), 0)

    p = tmp_path / "d"
    p.write_bytes(b"abc")
    with gpuio.open(p) as f:
        assert asyncio.run(main(f)) == 3


class Probe(bytearray):
    """Records its contents when it is destroyed."""

    captured = []

    def __del__(self):
        Probe.captured.append(bytes(self))


@pytest.mark.parametrize("size", [64 << 10, 20 << 20])
def test_buffer_kept_alive_while_in_flight(big_file, size):
    path, data = big_file
    Probe.captured.clear()
    with gpuio.open(path) as f:
        p = Probe(size)
        ref = weakref.ref(p)
        fut = f.pread_async(p, 12345)
        del p
        gc.collect()
        assert fut.result(timeout=60) == size
        fut = None
        released = wait_released(ref)
    assert released, "the buffer was never released"
    assert len(Probe.captured) == 1
    assert Probe.captured[0] == data[12345:12345 + size]


def test_gil_released_during_blocking_read(big_file):
    """Another thread observes the read part-way (some bytes read, not all): it ran Python code
    while the read was inside gpu-io, which it cannot do unless the GIL was released."""
    path, data = big_file
    observed = False
    for _attempt in range(5):
        q = gpuio.Queue()
        out = np.empty(len(data), dtype=np.uint8)
        with gpuio.open(path, direct="off") as f:
            t = threading.Thread(target=lambda: f.pread(out, 0, queue=q))
            seen = set()
            t.start()
            while t.is_alive():
                seen.add(q.stats()["bytes_read"])
            t.join()
        assert out.tobytes() == data
        if any(0 < b < len(data) for b in seen):
            observed = True
            break
    assert observed, "no partial progress seen from another thread: the GIL was held"


def test_gil_released_in_result():
    """A read's finisher takes the GIL to release the held buffer: result() would deadlock if it
    waited with the GIL held."""
    import tempfile, os

    with tempfile.NamedTemporaryFile() as t:
        t.write(b"z" * 100_000)
        t.flush()
        with gpuio.open(t.name) as f:
            for _ in range(50):
                assert f.pread_async(bytearray(100_000), 0).result(timeout=30) == 100_000


def test_no_leak(data_file):
    path, _ = data_file

    def rss():
        with open("/proc/self/statm") as s:
            return int(s.read().split()[1]) * 4096

    with gpuio.open(path) as f:
        buf = bytearray(4096)
        for _ in range(1000):
            f.pread(buf, 0)
            f.read(0, 4096)
            f.pread_async(buf, 0).result()
        before = rss()
        for i in range(10_000):
            f.pread(buf, (i * 4096) % (1 << 20))
            f.read(0, 4096)
            f.pread_async(buf, 0).result()
        gc.collect()
        after = rss()
    assert after - before < 16 << 20, f"resident memory grew by {(after - before) >> 10} KiB"
