"""Errors map onto Python's exceptions with the CLI's one-line message."""

import errno
import os
import subprocess
import sys

import pytest

import gpuio
from conftest import is_root


def test_missing_file():
    with pytest.raises(FileNotFoundError) as e:
        gpuio.open("/nonexistent/gpuio-test")
    err = e.value
    assert isinstance(err, gpuio.Error) and isinstance(err, OSError)
    assert err.errno == errno.ENOENT and err.filename == "/nonexistent/gpuio-test"
    assert str(err) == "open /nonexistent/gpuio-test: not found: No such file or directory (os error 2)"
    assert err.kind == "NotFound"


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        gpuio.open(tmp_path, "r+")
    assert isinstance(e.value, gpuio.Error)


def test_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    f = locked / "f"
    f.write_bytes(b"x")
    os.chmod(locked, 0)
    try:
        if not is_root():
            with pytest.raises(PermissionError) as e:
                gpuio.open(f)
            assert isinstance(e.value, gpuio.Error) and e.value.errno == errno.EACCES
            return
        # Root passes every permission check: check in a child that gives up root first (open
        # needs no engine thread, so a forked child may call it).
        print("running as root: checking PermissionError in a child running as uid 65534")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    gpuio.open(f)
                    code = 1
                except PermissionError as e:
                    ok = isinstance(e, gpuio.Error) and e.errno == errno.EACCES and str(f) in str(e)
                    code = 0 if ok else 2
            finally:
                os._exit(code)
        import time

        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the unprivileged child hung")
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        os.chmod(locked, 0o700)


def test_cli_and_python_say_the_same_line(tmp_path):
    """The message is the library error's Display, which the CLI prints after 'gpuio: '."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [os.environ.get("GPUIO_CLI"), shutil.which("gpuio")]
    for tdir in (os.environ.get("CARGO_TARGET_DIR"), os.path.join(root, "target")):
        if tdir:
            candidates += [os.path.join(tdir, "release", "gpuio"), os.path.join(tdir, "debug", "gpuio")]
    cli = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if cli is None:
        pytest.skip("no gpuio CLI binary found (GPUIO_CLI, PATH, target/release)")
    import struct

    cases = {
        "long.safetensors": struct.pack("<Q", 1 << 40),
        "array.safetensors": struct.pack("<Q", 10) + b"[         ",
        "missing.safetensors": None,
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        r = subprocess.run([cli, "load", str(p), "--device", "cpu"], capture_output=True, text=True)
        assert r.returncode != 0
        with pytest.raises(gpuio.Error) as e:
            gpuio.load_safetensors(p)
        assert f"gpuio: error: {e.value}\n" == r.stderr, (str(e.value), r.stderr)


def test_error_hierarchy():
    assert issubclass(gpuio.CorruptError, gpuio.Error)
    assert issubclass(gpuio.LimitError, gpuio.Error)
    assert issubclass(gpuio.OutOfMemoryError, gpuio.LimitError)
    assert issubclass(gpuio.NotFoundError, FileNotFoundError)
    assert issubclass(gpuio.NoSpaceError, OSError)
    import concurrent.futures

    assert issubclass(gpuio.CancelledError, concurrent.futures.CancelledError)
