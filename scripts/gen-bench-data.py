#!/usr/bin/env python3
"""Writes benchmark data for packs, seeded and reproducible.

  scripts/gen-bench-data.py mixed  SIZE OUT   # text and float32 arrays, about 2:1 under LZ4 at 64 KiB chunks
  scripts/gen-bench-data.py random SIZE OUT   # incompressible bytes

`mixed` alternates 16 KiB runs of English-like text (sentences of words drawn from a fixed
vocabulary with a Zipf-like skew) and 16 KiB runs of little-endian float32 values (a smooth signal plus
noise, quantized to 1/256, as in model weights after light quantization or sensor logs). An 8 MiB base
block is generated and tiled to SIZE: every 64 KiB chunk is compressed on its own, so the tiling
changes nothing a chunked codec can see. SIZE takes K/M/G suffixes.
"""
import math
import os
import random
import struct
import sys


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("ib")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def text_run(rng, words, n):
    out = bytearray()
    while len(out) < n:
        k = rng.randint(6, 18)
        sentence = " ".join(words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)] for _ in range(k))
        out += (sentence[0].upper() + sentence[1:] + ". ").encode()
        if rng.random() < 0.1:
            out += b"\n"
    return bytes(out[:n])


def float_run(rng, n, phase):
    vals = []
    for i in range(n // 4):
        x = math.sin((phase + i) * 0.01) * 3.0 + rng.gauss(0.0, 0.6)
        vals.append(round(x * 256) / 256)
    return struct.pack("<%df" % len(vals), *vals)


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("mixed", "random"):
        sys.exit(__doc__)
    kind, size, out = sys.argv[1], parse_size(sys.argv[2]), sys.argv[3]
    rng = random.Random(20261121)
    base_len = 8 << 20
    if kind == "random":
        base = rng.randbytes(base_len)
    else:
        syll = ["ka", "lo", "mi", "ter", "an", "sho", "ve", "ri", "dum", "pel", "nor", "qua", "es", "tin", "bra"]
        words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)})
        rng.shuffle(words)
        parts, n, phase = [], 0, 0
        while n < base_len:
            run = text_run(rng, words, 16384) if (n // 16384) % 2 == 0 else float_run(rng, 16384, phase)
            phase += 4096
            parts.append(run)
            n += len(run)
        base = b"".join(parts)[:base_len]
    with open(out, "wb") as f:
        left = size
        while left > 0:
            f.write(base[: min(left, base_len)])
            left -= min(left, base_len)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
