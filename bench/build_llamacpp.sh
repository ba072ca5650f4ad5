#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` and `llama-server` (the llama.cpp peer of lamina's benchmarks)
# from the llama.cpp source bundled in the llama-cpp-python sdist, so the binaries and the
# Python bindings (bench/requirements.txt) come from the same llama.cpp commit.
#
#   bash bench/build_llamacpp.sh              # -> bench/peers/bin/llama-bench, bench/peers/bin/llama-server
#   bash bench/build_llamacpp.sh --cmake-args # print the CMake arguments only (for CMAKE_ARGS of
#                                             # `pip install llama-cpp-python`, so the bindings match)
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default: the pin in bench/requirements.txt), JOBS (default 2),
# NICE (default 10). Release build, native CPU flags (GGML_NATIVE=ON), CPU backend only, no web UI,
# no OpenSSL, no curl: only the two targets are built. Takes ~10-20 minutes on 2 cores.
#
# AMX: on x86, -march=native turns on AMX wherever cpuid reports it, but Linux lets a process use
# the AMX tile registers only after it asks with arch_prctl(ARCH_REQ_XCOMP_PERM); on a VM whose
# cpuid says AMX while that request fails, llama-server died with SIGILL in tinygemm_kernel_amx at its
# first prompt. So unless a probe program's request succeeds, the build adds
# -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 (GCC lets explicit -mno-* flags override -march=native
# whatever their order). Set LLAMA_AMX=on / off to skip the probe.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$HERE/peers"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$HERE/requirements.txt")}"
[ -n "$VERSION" ] || { echo "no llama-cpp-python version pinned in bench/requirements.txt" >&2; exit 2; }

# "granted" when this process may use AMX (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0),
# "denied" when the request fails (no AMX, or the kernel / hypervisor does not allow it), "n/a" off x86-64.
amx_probe() {
    case "${LLAMA_AMX:-probe}" in on) echo granted; return ;; off) echo denied; return ;; esac
    [ "$(uname -m)" = x86_64 ] && [ "$(uname -s)" = Linux ] || { echo n/a; return; }
    local dir; dir="$(mktemp -d)"
    printf '%s\n' '#include <sys/syscall.h>' '#include <unistd.h>' \
        'int main(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0; }' \
        > "$dir/probe.c"
    if ${CC:-cc} -o "$dir/probe" "$dir/probe.c" 2>/dev/null && "$dir/probe"; then echo granted; else echo denied; fi
    rm -rf "$dir"
}
AMX="$(amx_probe)"
NATIVE_FLAGS=""
[ "$AMX" = denied ] && NATIVE_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS_LIST=(-DGGML_NATIVE=ON)  # no CMAKE_BUILD_TYPE: scikit-build-core ignores it in CMAKE_ARGS
[ -n "$NATIVE_FLAGS" ] && CMAKE_ARGS_LIST+=("-DCMAKE_C_FLAGS=$NATIVE_FLAGS" "-DCMAKE_CXX_FLAGS=$NATIVE_FLAGS")

if [ "${1:-}" = "--cmake-args" ]; then
    # quoted for a shell: scikit-build-core (llama-cpp-python's build) splits CMAKE_ARGS with shlex
    out=""
    for a in "${CMAKE_ARGS_LIST[@]}"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
    exit 0
fi

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

echo ">> AMX for this process: $AMX${NATIVE_FLAGS:+ (building with $NATIVE_FLAGS)}"
echo ">> configuring ($BUILD)"
cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release "${CMAKE_ARGS_LIST[@]}" \
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
    echo "build_flags=Release GGML_NATIVE=ON${NATIVE_FLAGS:+ $NATIVE_FLAGS} BUILD_SHARED_LIBS=OFF CPU backend"
    echo "amx=$AMX"
    echo "compiler=$(${CXX:-c++} --version | head -1)"
} > "$PEERS/bin/BUILD_INFO"
cat "$PEERS/bin/BUILD_INFO"
echo ">> done: $PEERS/bin/llama-bench $PEERS/bin/llama-server"
