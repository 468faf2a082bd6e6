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
