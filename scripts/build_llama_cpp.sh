#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-batched-bench, llama-perplexity, llama-quantize) for the
# optional peer rows of benchmarks/quantization.py. The source is the llama.cpp that
# llama-cpp-python 0.3.36 vendors (from PyPI, the only package index reachable here), built natively
# with AMX off: some Intel machines advertise AMX but forbid it, and llama.cpp would pick it.
# Needs cmake and g++ (`apt-get install cmake g++`; not part of scripts/setup.sh, since only this optional
# peer needs them). About 10 minutes on 2 quiet cores.
#
#   scripts/build_llama_cpp.sh [DEST]      (default DEST: .cache/llama.cpp; tools land in DEST/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
dest=$(realpath -m "${1:-.cache/llama.cpp}")
work="$dest/src"
mkdir -p "$work"
if [[ ! -f "$work/llama_cpp_python-$version.tar.gz" ]]; then
  .venv/bin/python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
fi
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF \
  -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF
cmake --build "$work/build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-perplexity llama-quantize
mkdir -p "$dest/bin"
for t in llama-bench llama-batched-bench llama-perplexity llama-quantize; do cp "$work/build/bin/$t" "$dest/bin/"; done
echo "llama.cpp tools in $dest/bin (benchmarks/quantization.py --llama-cpp $dest/bin)"
