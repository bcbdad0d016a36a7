"""Shared fixtures: the real chat model (fetched by `make models`) and the command line built from
the same sources (`target/debug/persona-lens`, or $PERSONA_LENS_BIN)."""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import persona_lens as pl

ROOT = Path(__file__).resolve().parents[3]
MODEL = "smollm2-135m-instruct"


def cli_path() -> str:
    return os.environ.get("PERSONA_LENS_BIN", str(ROOT / "target" / "debug" / "persona-lens"))


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([cli_path(), *args], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors as numpy arrays (the format: u64 header length, JSON
    header, raw little-endian data), read by hand so the tests need numpy only."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U32": np.uint32}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


@pytest.fixture(scope="session")
def model() -> pl.Model:
    if not Path(cli_path()).exists():
        pytest.fail(f"{cli_path()} not built: run `cargo build -p persona-lens` (make test does)")
    return pl.Model(MODEL)
