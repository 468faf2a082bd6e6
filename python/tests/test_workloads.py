"""gpuio.graph and gpuio.gather against references computed here: a plain BFS over the .bel file read
with numpy, and the gather's checksum against the CLI's --json on the same settings."""

import json
import os
import subprocess
from collections import deque

import numpy as np
import pytest

import gpuio


def reference_bfs(prefix, source, vertices):
    """A plain BFS over the .bel files read with numpy: each file is a 16-byte header, then
    little-endian u64s (vertex offsets in .col, destinations in .dst)."""
    offs = np.fromfile(f"{prefix}.bel.col", dtype="<u8", offset=16)
    dst = np.fromfile(f"{prefix}.bel.dst", dtype="<u8", offset=16)
    assert len(offs) == vertices + 1 and int(offs[-1]) == len(dst)
    depth = np.full(vertices, -1, dtype=np.int32)
    depth[source] = 0
    q = deque([source])
    while q:
        v = q.popleft()
        for w in dst[offs[v]:offs[v + 1]]:
            if depth[w] < 0:
                depth[w] = depth[v] + 1
                q.append(int(w))
    return depth


def test_generate_and_bfs_in_every_mode_match_a_reference(tmp_path):
    prefix = tmp_path / "g"
    info = gpuio.graph.generate(10, prefix, degree=8, seed=3)
    assert info["vertices"] == 1024 and info["edges"] > 0
    assert os.path.exists(info["col"]) and os.path.exists(info["dst"])
    # From the highest-degree vertex, so the search reaches most of the graph.
    offs = np.fromfile(f"{prefix}.bel.col", dtype="<u8", offset=16)
    source = int(np.argmax(np.diff(offs)))
    runs = {m: gpuio.graph.bfs(prefix, source, mode=m) for m in ("cache", "memory", "mmap")}
    first = runs["cache"]
    ref = reference_bfs(prefix, source, 1024)
    assert (ref >= 0).sum() > 100
    for m, r in runs.items():
        assert r["mode"] == m
        assert r["depths"].dtype == np.int32 and r["depths"].shape == (1024,)
        assert np.array_equal(r["depths"], ref), m
        assert r["vertices_reached"] == int((ref >= 0).sum())
    assert first["source_degree"] == int(offs[source + 1] - offs[source])


def test_gpu_cache_modes_match_the_host_or_say_they_need_a_gpu(tmp_path):
    """On a GPU (GPUIO_TEST_DEVICE=cuda:N) the kernels' search and gather match the host modes; on the
    host stand-in (the default here) both are refused with the reason."""
    device = os.environ.get("GPUIO_TEST_DEVICE", "cpu")
    prefix = tmp_path / "g"
    gpuio.graph.generate(8, prefix, degree=8, seed=3)
    table = tmp_path / "t.bin"
    np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8).tofile(table)
    if device == "cpu":
        for mode in ("gpu-cache", "gpu-memory"):
            with pytest.raises(gpuio.Error, match="cpu runs no kernels"):
                gpuio.graph.bfs(prefix, 1, mode=mode, device=device)
        with pytest.raises(gpuio.Error, match="cpu runs no kernels"):
            gpuio.gather(table, 256, 8, 4, mode="gpu-cache", device=device)
        with pytest.raises(ValueError):
            gpuio.gather(table, 256, 8, 4, mode="nope")
        with pytest.raises(ValueError, match="delivery"):
            gpuio.graph.bfs(prefix, 1, mode="gpu-cache", device=device, delivery="dma")
        with pytest.raises(ValueError, match="delivery"):
            gpuio.gather(table, 256, 8, 4, mode="gpu-cache", device=device, delivery="dma")
        return
    host = gpuio.graph.bfs(prefix, 1, mode="memory")
    gpu = gpuio.graph.bfs(prefix, 1, mode="gpu-cache", device=device)
    assert np.array_equal(host["depths"], gpu["depths"])
    # BaM's figures: line requests, the lookups they were misses of, requests per warp.
    assert 0 < gpu["requests"] <= gpu["line_lookups"], gpu
    assert 0.0 <= gpu["hit_rate"] < 1.0 and gpu["requests_per_warp"] > 0, gpu
    # The in-memory reference on the GPU finds the same depths, its load reported apart.
    mem = gpuio.graph.bfs(prefix, 1, mode="gpu-memory", device=device)
    assert np.array_equal(host["depths"], mem["depths"])
    assert mem["load_seconds"] > 0, mem
    # The kernel delivery and another server size find the same depths.
    k = gpuio.graph.bfs(prefix, 1, mode="gpu-cache", device=device, delivery="kernel",
                        server_threads=3)
    assert np.array_equal(host["depths"], k["depths"])
    a = gpuio.gather(table, 256, 8, 4)
    b = gpuio.gather(table, 256, 8, 4, mode="gpu-cache", device=device)
    assert a["run"]["checksum"] == b["run"]["checksum"]
    k = gpuio.gather(table, 256, 8, 4, mode="gpu-cache", device=device, delivery="kernel",
                     server_threads=1)
    assert a["run"]["checksum"] == k["run"]["checksum"]
    assert b["run"]["warps"] > 0 and b["run"]["requests_per_warp"] > 0, b["run"]
    assert "warps" not in a["run"]


def test_the_same_seed_gives_the_same_graph(tmp_path):
    a = gpuio.graph.generate(8, tmp_path / "a", seed=7)
    b = gpuio.graph.generate(8, tmp_path / "b", seed=7)
    for k in ("col", "dst"):
        assert open(a[k], "rb").read() == open(b[k], "rb").read()


def test_bad_settings_are_errors_naming_the_setting(tmp_path):
    with pytest.raises(gpuio.InvalidInputError, match="scale"):
        gpuio.graph.generate(0, tmp_path / "g")
    gpuio.graph.generate(6, tmp_path / "g")
    with pytest.raises(gpuio.InvalidInputError, match="line"):
        gpuio.graph.bfs(tmp_path / "g", 0, line_size=1000)
    with pytest.raises(ValueError):
        gpuio.graph.bfs(tmp_path / "g", 0, mode="nope")
    with pytest.raises(FileNotFoundError):
        gpuio.graph.bfs(tmp_path / "missing", 0)


def test_gather_matches_the_cli_on_the_same_settings(tmp_path):
    table = tmp_path / "t.bin"
    np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tofile(table)
    r = gpuio.gather(table, 4096, 64, 8, dist="zipf:1.1", cache_size="25%", prefetch=True, seed=5)
    assert r["rows"] == 1024 and r["rows_gathered"] == 512
    assert r["run"]["checksum"] == r["sync"]["checksum"], "prefetch and sync read the same rows"
    assert r["speedup"] is not None
    cli = os.environ.get("GPUIO_CLI") or os.path.join(
        os.path.dirname(__file__), "..", "..", "target", "release", "gpuio")
    if not os.path.exists(cli):
        pytest.skip(f"no gpuio binary at {cli} to compare with (set GPUIO_CLI)")
    out = subprocess.run([cli, "gather", "--table", str(table), "--row-bytes", "4096", "--batch", "64",
                          "--batches", "8", "--dist", "zipf:1.1", "--cache-size", "25%", "--seed", "5",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["checksum"] == r["run"]["checksum"]


class Stop(Exception):
    pass


def check_progress(calls):
    """Every call has the documented keys; done never decreases; the last has done == total."""
    assert calls, "the progress callback was never called"
    for c in calls:
        assert set(c) == {"phase", "done", "total", "level", "reached", "frontier", "note"}, c
    dones = [c["done"] for c in calls]
    assert dones == sorted(dones), dones
    assert calls[-1]["total"] is not None and calls[-1]["done"] == calls[-1]["total"], calls[-1]


def test_progress_callbacks_report_every_workload(tmp_path):
    prefix = tmp_path / "g"
    calls = []
    gpuio.graph.generate(9, prefix, degree=4, progress=calls.append, progress_interval=0)
    check_progress(calls)
    assert [c["phase"] for c in calls if c["done"] == 0][0] == "generating edges"
    assert calls[-1] == dict(calls[-1], phase="writing", done=3, total=3)

    offs = np.fromfile(f"{prefix}.bel.col", dtype="<u8", offset=16)
    source = int(np.argmax(np.diff(offs)))
    for mode in ("cache", "memory"):
        calls = []
        r = gpuio.graph.bfs(prefix, source, mode=mode, progress=calls.append, progress_interval=0)
        check_progress(calls)
        levels = [c for c in calls if c["level"] is not None]
        assert [c["level"] for c in levels] == list(range(1, r["levels"] + 1)), mode
        assert levels[-1]["frontier"] == 0 and levels[-1]["reached"] == r["vertices_reached"]
        assert all(c["phase"] == "searching" for c in levels)
        assert all(c["total"] is None for c in levels[:-1])

    table = tmp_path / "table"
    table.write_bytes(np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    calls = []
    gpuio.gather(table, 512, 16, 25, prefetch=True, progress=calls.append, progress_interval=0)
    check_progress(calls)
    assert calls[-1]["total"] == 50 and {c["done"] for c in calls} == set(range(51))
    assert {c["phase"] for c in calls} == {"gathering with prefetch", "gathering synchronously (reference)"}


def test_progress_is_rate_limited(tmp_path):
    table = tmp_path / "table"
    table.write_bytes(bytes(1 << 20))
    calls = []
    gpuio.gather(table, 512, 4, 3000, progress=calls.append, progress_interval=3600)
    # The first report, the phase, and the last step: not one call per batch.
    assert len(calls) <= 3, len(calls)
    check_progress(calls)


def test_progress_exception_stops_the_workload_and_is_raised(tmp_path):
    table = tmp_path / "table"
    table.write_bytes(bytes(1 << 20))
    seen = []

    def stop_at_5(p):
        seen.append(p["done"])
        if p["done"] >= 5:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        gpuio.gather(table, 512, 16, 100_000, progress=stop_at_5, progress_interval=0)
    assert max(seen) == 5, "no batch was reported after the callback raised"

    prefix = tmp_path / "g"

    def stop_writing(p):
        if p["phase"] == "writing":
            raise KeyError("no")

    with pytest.raises(KeyError):
        gpuio.graph.generate(9, prefix, progress=stop_writing)
    assert not os.path.exists(f"{prefix}.bel.col") and not os.path.exists(f"{prefix}.bel.dst")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    gpuio.graph.generate(9, prefix, degree=4)
    levels = []

    def stop_at_first_level(p):
        if p["level"] is not None:
            levels.append(p["level"])
            raise Stop()

    offs = np.fromfile(f"{prefix}.bel.col", dtype="<u8", offset=16)
    source = int(np.argmax(np.diff(offs)))
    out = tmp_path / "depths"
    with pytest.raises(Stop):
        gpuio.graph.bfs(prefix, source, depths_out=out, progress=stop_at_first_level)
    assert levels == [1] and not out.exists()

    with pytest.raises(TypeError):
        gpuio.gather(table, 512, 16, 10, progress=42)
    with pytest.raises(ValueError):
        gpuio.gather(table, 512, 16, 10, progress=print, progress_interval=-1)
