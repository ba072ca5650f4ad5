#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` and `llama-server` (the llama.cpp peer of lamina's benchmarks)
# from the llama.cpp source bundled in the llama-cpp-python sdist, so the binaries and the
# Python bindings (bench/requirements.txt) come from the same llama.cpp commit.
#
#   bash bench/build_llamacpp.sh            # -> bench/peers/bin/llama-bench, bench/peers/bin/llama-server
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default: the pin in bench/requirements.txt), JOBS (default 2),
# NICE (default 10). Release build, native CPU flags (GGML_NATIVE=ON), CPU backend only, no web UI,
# no OpenSSL, no curl: only the two targets are built. Takes ~10-20 minutes on 2 cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$HERE/peers"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$HERE/requirements.txt")}"
[ -n "$VERSION" ] || { echo "no llama-cpp-python version pinned in bench/requirements.txt" >&2; exit 2; }

mkdir -p "$PEERS/src" "$PEERS/bin"
SDIST="$PEERS/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo ">> downloading the llama-cpp-python $VERSION sdist"
    python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$PEERS/src"
fi
SRC="$PEERS/src/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    echo ">> unpacking"
    tar -xzf "$SDIST" -C "$PEERS/src"
fi
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$PEERS/build-$VERSION"

echo ">> configuring ($BUILD)"
cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF

echo ">> building llama-bench and llama-server with -j$JOBS (nice $NICE)"
nice -n "$NICE" cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-bench llama-server

cp -f "$BUILD/bin/llama-bench" "$BUILD/bin/llama-server" "$PEERS/bin/"
# What was built, for bench/RESULTS.md: the sdist version and the llama.cpp commit it vendors.
COMMIT="$(git -C "$LLAMA" rev-parse HEAD 2>/dev/null || echo unknown)"
"$PEERS/bin/llama-bench" --version >/dev/null 2>&1 || true
{
    echo "llama-cpp-python=$VERSION"
    echo "llama.cpp_commit=$COMMIT"
    echo "build_flags=Release GGML_NATIVE=ON BUILD_SHARED_LIBS=OFF CPU backend"
    echo "compiler=$(${CXX:-c++} --version | head -1)"
} > "$PEERS/bin/BUILD_INFO"
cat "$PEERS/bin/BUILD_INFO"
echo ">> done: $PEERS/bin/llama-bench $PEERS/bin/llama-server"
