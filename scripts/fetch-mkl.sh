#!/usr/bin/env bash
# Fetch Intel MKL's runtime libraries from PyPI's `mkl` wheel into mkl/lib: persona-lens opens
# libmkl_rt there at run time and runs every f32 matrix product on MKL's sgemm (crates/engine/src/mkl.rs).
# Without it everything still works, on gemm's kernels, slower (bench/README.md).
# Usage: scripts/fetch-mkl.sh [DIR]   (default: mkl). Idempotent: a verified install is left alone.
# MKL is under the Intel Simplified Software License (the wheel's LICENSE, copied to DIR).
set -euo pipefail
dir="${1:-mkl}"
py="${PYTHON:-python3}"
version="2026.2.1"
wheel="mkl-$version-py2.py3-none-manylinux_2_28_x86_64.whl"
wheel_sha="76322a3abf512594ab7b4e82cb72df91e4e5d195498769aa8b292373c1ddd6d1"
# The single runtime library, its core, the LP64 interface, GNU OpenMP and sequential threading,
# and the per-CPU kernels (AVX-512, AVX10, AVX2, SSE4.2, generic) that MKL picks at run time.
libs="rt core intel_lp64 gnu_thread sequential avx512 avx10 avx2 mc3 def"

if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "skip: MKL's wheel is for x86_64 Linux; persona-lens runs on gemm's kernels here"; exit 0
fi
if [ -f "$dir/lib/VERSION" ] && [ "$(cat "$dir/lib/VERSION")" = "$version" ]; then
  echo "ok: $dir/lib (MKL $version)"; exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching MKL $version (PyPI package mkl, 229 MB)..."
"$py" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/whl" "mkl==$version"
[ "$(sha256sum "$tmp/whl/$wheel" | cut -d' ' -f1)" = "$wheel_sha" ] \
  || { echo "error: sha256 mismatch for $wheel; delete $dir and run make mkl again" >&2; exit 1; }
"$py" - "$tmp/whl/$wheel" "$tmp/lib" $libs <<'PY'
import pathlib, shutil, sys, zipfile
wheel, out, names = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
out.mkdir(parents=True)
with zipfile.ZipFile(wheel) as z:
    members = {pathlib.PurePosixPath(n).name: n for n in z.namelist()}
    for name in [f"libmkl_{n}.so.3" for n in names] + ["LICENSE.txt"]:
        source = members.get(name)
        if source is None:
            sys.exit(f"error: {name} is not in {wheel}")
        with z.open(source) as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        (out / name).chmod(0o755 if name.endswith(".3") else 0o644)
PY
echo "$version" > "$tmp/lib/VERSION"
rm -rf "$dir/lib"
mv "$tmp/lib" "$dir/lib"
echo "ok: $dir/lib (MKL $version, $(du -sh "$dir/lib" | cut -f1))"
