#!/usr/bin/env bash
# Build and install Horovod 0.28.1 for the torch in a given Python environment.
#
#   launch/install_horovod.sh [PYTHON]          # default: $PYTHON, else python3
#   PYTHON=.venv/bin/python launch/install_horovod.sh
#
# Why a script: Horovod 0.28.1 does not compile against current torch as published. Its CMake
# files ask for C++14 (CMakeLists.txt, horovod/torch/CMakeLists.txt) and torch >= 2.1 headers
# need C++17. This script downloads the 0.28.1 sdist from PyPI, switches CMAKE_CXX_STANDARD
# 14 -> 17 in those two files, and builds a wheel with
#   HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
#   HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
# plus HOROVOD_GPU_OPERATIONS=NCCL when torch is a CUDA build and nvcc and NCCL are present
# (force with SECONDORDER_HOROVOD_GPU=nccl|none; default auto).
#
# Idempotent: nothing happens when `import horovod.torch` already works; a wheel cached for the
# same torch / Python / GPU variant is installed without rebuilding. The cache lives outside the
# checkout: ${SECONDORDER_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/secondorder/wheels}.
# The first build takes about 2-3 minutes on 2 cores (MAKEFLAGS, default -j<cores>).
set -euo pipefail

PYTHON="${1:-${PYTHON:-python3}}"
HOROVOD_VERSION=0.28.1
GPU_CHOICE="${SECONDORDER_HOROVOD_GPU:-auto}"
CACHE_ROOT="${SECONDORDER_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/secondorder/wheels}"

log() { echo "[install_horovod] $*"; }
die() { echo "[install_horovod] error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no Python at '$PYTHON' (pass it as the argument)"
"$PYTHON" -c "import torch" 2>/dev/null || die "torch is not importable by $PYTHON; install torch first"

if "$PYTHON" -c "import horovod.torch" 2>/dev/null; then
    log "horovod.torch already importable by $PYTHON; nothing to do"
    exit 0
fi

# -- which variant to build ----------------------------------------------------------------------
# NCCL for GPU operations: a system install (nccl.h under NCCL_HOME, CUDA_HOME or /usr), else
# the nvidia-nccl wheel that CUDA builds of torch depend on (the same NCCL torch loads).
find_nccl_header() {
    local dir
    for dir in "${HOROVOD_NCCL_HOME:-}" "${NCCL_HOME:-}" "${CUDA_HOME:-/usr/local/cuda}" /usr /usr/local; do
        [[ -n "$dir" && -f "$dir/include/nccl.h" ]] && { echo "$dir"; return 0; }
    done
    return 1
}
nccl_from_python() {
    "$PYTHON" - <<'PY'
import os, sys
try:
    import nvidia.nccl as package
except ImportError:
    sys.exit(1)
root = list(package.__path__)[0]
ok = os.path.isfile(os.path.join(root, "include", "nccl.h"))
ok = ok and os.path.isfile(os.path.join(root, "lib", "libnccl.so.2"))
print(root) if ok else sys.exit(1)
PY
}

TORCH_CUDA="$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")"
GPU_OPS=""
case "$GPU_CHOICE" in
    none) ;;
    nccl) GPU_OPS=NCCL ;;
    auto)
        if [[ -n "$TORCH_CUDA" ]] && command -v nvcc >/dev/null 2>&1 \
            && { find_nccl_header >/dev/null || nccl_from_python >/dev/null; }; then
            GPU_OPS=NCCL
        fi
        ;;
    *) die "SECONDORDER_HOROVOD_GPU must be auto, nccl or none, got '$GPU_CHOICE'" ;;
esac
if [[ "$GPU_OPS" == NCCL && -z "$TORCH_CUDA" ]]; then
    die "NCCL operations need a CUDA build of torch; $PYTHON has torch.version.cuda=None"
fi

TAG="$("$PYTHON" -c "import sys, torch; print(f'py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}')")"
VARIANT="$([[ "$GPU_OPS" == NCCL ]] && echo "nccl-cuda${TORCH_CUDA}" || echo cpu)"
CACHE_DIR="$CACHE_ROOT/horovod-$HOROVOD_VERSION/$TAG-$VARIANT"

install_cached() {
    local wheel
    wheel="$(ls "$CACHE_DIR"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
    [[ -n "$wheel" ]] || return 1
    log "installing cached wheel $wheel"
    "$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$wheel"
    # Horovod's runtime dependencies (setup.py's require_list).
    "$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging
    "$PYTHON" -c "import horovod.torch" || die "the cached wheel does not import; delete $CACHE_DIR"
    return 0
}

if install_cached; then
    log "done (from cache)"
    exit 0
fi

# -- build ----------------------------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 || die "cmake (>= 3.13) is needed to build Horovod"
command -v c++ >/dev/null 2>&1 || die "a C++17 compiler (c++) is needed to build Horovod"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "building Horovod $HOROVOD_VERSION ($VARIANT) for $TAG in $WORK"

# Build requirements, installed into the target environment because the build runs without
# isolation: an isolated build would pull a different (CUDA) torch to compile against.
"$PYTHON" -m pip install --quiet "setuptools>=61" wheel cloudpickle psutil pyyaml packaging

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"

for cmake_file in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    grep -q "set(CMAKE_CXX_STANDARD 14)" "$cmake_file" \
        || die "expected 'set(CMAKE_CXX_STANDARD 14)' in $cmake_file (sdist changed?)"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$cmake_file"
done

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
if [[ "$GPU_OPS" == NCCL ]]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    export HOROVOD_CUDA_HOME="${HOROVOD_CUDA_HOME:-${CUDA_HOME:-/usr/local/cuda}}"
    if NCCL_DIR="$(find_nccl_header)"; then
        export HOROVOD_NCCL_HOME="${HOROVOD_NCCL_HOME:-$NCCL_DIR}"
    elif NCCL_DIR="$(nccl_from_python)"; then
        # The wheel ships libnccl.so.2 only; CMake looks for libnccl.so.
        mkdir -p "$WORK/nccl-lib"
        ln -s "$NCCL_DIR/lib/libnccl.so.2" "$WORK/nccl-lib/libnccl.so"
        export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$WORK/nccl-lib"
        export HOROVOD_NCCL_LINK=SHARED
    else
        die "NCCL operations requested but no nccl.h found (set NCCL_HOME)"
    fi
else
    unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_BROADCAST HOROVOD_GPU_ALLGATHER
fi
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}"

"$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$WORK/dist" "$SRC"
mkdir -p "$CACHE_DIR"
cp "$WORK"/dist/horovod-"$HOROVOD_VERSION"-*.whl "$CACHE_DIR/"
log "cached the wheel in $CACHE_DIR"

install_cached || die "the freshly built wheel did not install"
log "done: $("$PYTHON" -c "import horovod; print('horovod', horovod.__version__)")"
