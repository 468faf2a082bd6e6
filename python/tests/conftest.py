"""Shared fixtures: scratch files with known random contents; waiting for an object to be freed."""

import gc
import os
import time

import numpy as np
import pytest


@pytest.fixture
def data_file(tmp_path):
    """A 3 MiB + 123 byte file of random bytes; returns (path, bytes)."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(3 << 20) + 123, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def big_file(tmp_path):
    """A 40 MiB file (several engine pieces); returns (path, bytes)."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=40 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def wait_released(ref, tries=100):
    """Collects garbage until the weak reference `ref` is dead (at most `tries` times, 10 ms apart);
    returns whether it died."""
    for _ in range(tries):
        gc.collect()
        if ref() is None:
            return True
        time.sleep(0.01)
    return False
