"""Reads straight into the caller's buffer (no copy) and the bounce path, told apart by
File.copy_stats(), byte-exact against Python's own file reads."""

import gc
import os
import weakref

import numpy as np
import pytest

import gpuio
from conftest import wait_released

PAGE = 4096


def aligned(n, misalign=0, cls=np.ndarray):
    """n bytes of a fresh uint8 array at an address `misalign` past a 4096-byte boundary."""
    arena = cls(shape=(n + 2 * PAGE,), dtype=np.uint8)
    arena[:] = 0xEE
    skew = (-arena.ctypes.data) % PAGE
    view = arena[skew + misalign:skew + misalign + n]
    assert view.ctypes.data % PAGE == misalign
    return view


def delta(f, before):
    after = f.copy_stats()
    return {k: after[k] - before[k] for k in after}


def open_direct(path):
    f = gpuio.open(path, direct="on")
    assert f.is_direct, f.direct_reason
    return f


@pytest.fixture
def direct_file(tmp_path, data_file):
    """The data file, for O_DIRECT (on the temporary directory's filesystem)."""
    path, data = data_file
    try:
        gpuio.open(path, direct="on").close()
    except OSError as e:
        pytest.skip(f"O_DIRECT is refused here: {e}")
    return path, data


def test_aligned_buffer_is_read_straight_and_unaligned_bounced(direct_file):
    path, data = direct_file
    with open_direct(path) as f:
        for off, n in [(0, PAGE), (8 * PAGE, 64 * PAGE), (PAGE, 300 * PAGE)]:
            buf = aligned(n)
            s = f.copy_stats()
            assert f.pread(buf, off) == n
            assert buf.tobytes() == data[off:off + n]
            assert delta(f, s)["reads_zero_copy"] == 1 and delta(f, s)["reads_copied"] == 0, (off, n)
            assert delta(f, s)["bytes_zero_copy"] == n
        # Misaligned address, offset or length: bounced through an engine buffer, same bytes.
        for misalign, off, n in [(1, 0, PAGE), (0, 7, PAGE), (0, PAGE, 1000), (64, 3 * PAGE, 10 * PAGE)]:
            buf = aligned(n, misalign)
            s = f.copy_stats()
            assert f.pread(buf, off) == n
            assert buf.tobytes() == data[off:off + n]
            assert delta(f, s)["reads_copied"] == 1 and delta(f, s)["reads_zero_copy"] == 0, (misalign, off, n)
        # At the end of the file: short. (The bytes past it are unspecified: Linux's O_DIRECT read
        # zero-fills the caller's buffer past the end of the file, as os.preadv would.)
        end = len(data) // PAGE * PAGE
        buf = aligned(4 * PAGE)
        s = f.copy_stats()
        assert f.pread(buf, end) == len(data) - end
        assert buf[:len(data) - end].tobytes() == data[end:]
        assert delta(f, s)["reads_zero_copy"] == 1


def test_buffered_file_reads_straight_at_any_alignment(data_file):
    path, data = data_file
    with gpuio.open(path, direct="off") as f:
        buf = bytearray(12345)
        s = f.copy_stats()
        assert f.pread(buf, 3) == 12345 and bytes(buf) == data[3:12348]
        assert delta(f, s)["reads_zero_copy"] == 1 and delta(f, s)["reads_copied"] == 0


def test_large_aligned_read_in_pieces(tmp_path, big_file):
    path, data = big_file
    try:
        f = open_direct(path)
    except OSError as e:
        pytest.skip(f"O_DIRECT is refused here: {e}")
    with f:
        buf = aligned(len(data) - PAGE)
        s = f.copy_stats()
        assert f.pread(buf, PAGE) == len(data) - PAGE
        assert buf.tobytes() == data[PAGE:]
        assert delta(f, s)["reads_zero_copy"] == 1
        fut = f.pread_async(buf, 0)
        assert fut.result(timeout=60) == len(buf) and buf.tobytes() == data[:len(buf)]
        assert delta(f, s)["reads_zero_copy"] == 2


def test_async_aligned_and_not(direct_file):
    path, data = direct_file
    with open_direct(path) as f:
        a, b = aligned(16 * PAGE), aligned(16 * PAGE, 8)
        s = f.copy_stats()
        fa, fb = f.pread_async(a, 2 * PAGE), f.pread_async(b, 2 * PAGE)
        assert fa.result(timeout=30) == fb.result(timeout=30) == 16 * PAGE
        want = data[2 * PAGE:18 * PAGE]
        assert a.tobytes() == want and b.tobytes() == want
        d = delta(f, s)
        assert d["reads_zero_copy"] == 1 and d["reads_copied"] == 1


def test_batch_lends_aligned_items(direct_file):
    path, data = direct_file
    rng = np.random.default_rng(5)
    pages = rng.integers(0, len(data) // PAGE, 128)
    with open_direct(path) as f:
        # Slices of one aligned array (one lent buffer), out of order.
        arena = aligned(128 * PAGE)
        order = rng.permutation(128)
        items = [(arena[j * PAGE:(j + 1) * PAGE], int(p) * PAGE) for j, p in zip(order, pages)]
        s = f.copy_stats()
        assert f.pread_batch(items) == [PAGE] * 128
        for view, off in items:
            assert view.tobytes() == data[off:off + PAGE]
        assert delta(f, s)["reads_zero_copy"] == 128 and delta(f, s)["reads_copied"] == 0
        # Separate aligned arrays, misaligned ones, and an item past the end, in one batch.
        sep = [aligned(PAGE) for _ in range(8)]
        mis = [aligned(PAGE, 16) for _ in range(8)]
        tail = aligned(PAGE)
        end = len(data) // PAGE * PAGE
        items = [(b, int(p) * PAGE) for b, p in zip(sep + mis, pages)] + [(tail, end), (aligned(PAGE), len(data) + 1)]
        s = f.copy_stats()
        got = f.pread_batch(items)
        assert got == [PAGE] * 16 + [len(data) - end, 0]
        for b, off in items[:16]:
            assert b.tobytes() == data[off:off + PAGE]
        assert tail[:len(data) - end].tobytes() == data[end:]
        d = delta(f, s)
        assert d["reads_zero_copy"] == 9 and d["reads_copied"] == 8, d
        # The same buffer twice: lent once, the other copied, never two loads into one place at once.
        one = aligned(PAGE)
        s = f.copy_stats()
        assert f.pread_batch([(one, 0), (one, PAGE)]) == [PAGE, PAGE]
        assert one.tobytes() in (data[:PAGE], data[PAGE:2 * PAGE])
        assert delta(f, s)["reads_zero_copy"] == 1 and delta(f, s)["reads_copied"] == 1


def test_pwrite_aligned_goes_straight(tmp_path):
    path = tmp_path / "w.bin"
    payload = np.random.default_rng(6).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    try:
        f = gpuio.open(path, "w", direct="on")
    except OSError as e:
        pytest.skip(f"O_DIRECT is refused here: {e}")
    with f:
        src = aligned(len(payload))
        src[:] = payload
        s = f.copy_stats()
        assert f.pwrite(src, PAGE) == len(payload)
        assert f.pwrite(payload[1:101], 0) == 100  # misaligned: copied
        d = delta(f, s)
        assert d["writes_zero_copy"] == 1 and d["writes_copied"] == 1
    raw = path.read_bytes()
    assert raw[PAGE:] == payload.tobytes() and raw[:100] == payload[1:101].tobytes()


class ProbeArray(np.ndarray):
    """Records the bytes of the aligned window when the array that owns the memory is destroyed."""

    captured = []
    window = None

    def __del__(self):
        if self.base is None and ProbeArray.window is not None:
            lo, hi = ProbeArray.window
            ProbeArray.captured.append(np.asarray(self)[lo:hi].tobytes())


@pytest.mark.parametrize("size", [16 * PAGE, 20 << 20])
def test_lent_buffer_kept_alive_while_in_flight(big_file, size):
    """The caller drops every reference to an aligned buffer while a straight read into it is in
    flight: the memory stays valid until the read is done, gets the right bytes, and is then freed."""
    path, data = big_file
    try:
        f = open_direct(path)
    except OSError as e:
        pytest.skip(f"O_DIRECT is refused here: {e}")
    ProbeArray.captured.clear()
    with f:
        view = aligned(size, cls=ProbeArray)
        owner = view.base
        skew = view.ctypes.data - owner.ctypes.data
        ProbeArray.window = (skew, skew + size)
        ref = weakref.ref(owner)
        del owner
        s = f.copy_stats()
        fut = f.pread_async(view, 2 * PAGE)
        del view
        gc.collect()
        assert fut.result(timeout=60) == size
        assert delta(f, s)["reads_zero_copy"] == 1
        fut = None
        released = wait_released(ref)
    assert released, "the buffer was never released"
    assert ProbeArray.captured == [data[2 * PAGE:2 * PAGE + size]]
