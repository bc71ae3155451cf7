# secondorder on GPUs: PyTorch with CUDA and NCCL, the project, and Horovod with NCCL GPU
# operations, in two stages:
#   1. horovod-build (the CUDA devel image: nvcc, headers): launch/install_horovod.sh compiles
#      Horovod's wheel against this image's torch;
#   2. runtime (the matching runtime image, several GB smaller): only that wheel is copied in and
#      installed, then the project.
#
# One NCCL. torch's CUDA wheels bring their NCCL as a Python package (nvidia-nccl); the devel
# image also has a system NCCL from its CUDA base. Horovod is compiled against torch's copy
# (HOROVOD_NCCL_HOME points at the headers and library of that package, linked as a shared
# library), and the runtime image has no system NCCL (a check below fails the build if one
# appears). At run time `import horovod.torch` imports torch first, so the libnccl.so.2 that
# torch loaded is the one Horovod's library resolves to: one NCCL per process.
#
# Build (from the repository root; about 10 minutes, most of it compiling Horovod):
#   docker build -t secondorder:latest .
#
# Entry points (the image's working directory is the project; mount data and runs):
#   # torch.distributed over NCCL, one node with 8 GPUs
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/runs":/workspace/secondorder/runs \
#       secondorder:latest launch/torchrun.sh experiment=imagenet_resnet50_sgd \
#       data.root=/data/imagenet
#   # Horovod over NCCL (gloo controller), 8 ranks on this node
#   docker run --gpus all --ipc=host ... secondorder:latest \
#       launch/horovodrun.sh -np 8 model=resnet50 data=imagenet data.root=/data/imagenet
#   # several nodes: launch/torchrun.sh with NNODES, NODE_RANK, MASTER_ADDR, RDZV_ID on each node
#   # (add --network=host), or launch/slurm/*.sbatch with the container; see launch/README.md.
#   # a CPU smoke test (no GPU needed): 20 steps of the demo
#   docker run --rm secondorder:latest python -m secondorder.train experiment=demo \
#       trainer.device=cpu trainer.max_steps=20 trainer.target.metric=null \
#       trainer.target.value=null logger=none
#   # print the commands instead of running them:
#   docker run --rm secondorder:latest launch/torchrun.sh --dry-run --nproc 8
#
# The base images are pinned by tag: PyTorch 2.13.0 (the newest torch the tests run on) for
# CUDA 13.2 with cuDNN 9; their Python is the system Python 3.12 of Ubuntu 24.04, so pip needs
# PIP_BREAK_SYSTEM_PACKAGES (pyproject.toml asks >=3.10 and torch>=2.1; tests/test_dockerfile.py
# checks that these agree, and each stage checks them again at build time).

# -- stage 1: Horovod's wheel ---------------------------------------------------------------------
FROM pytorch/pytorch:2.13.0-cuda13.2-cudnn9-devel AS horovod-build

ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0
# CUDA architectures Horovod's kernels are built for: A100 (8.0) and H100/H200 (9.0).
ARG HOROVOD_BUILD_CUDA_CC_LIST=80,90

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    SECONDORDER_WHEEL_CACHE=/opt/secondorder/wheels

# A compiler and CMake for Horovod's C++/CUDA build; this stage is discarded, so the packages
# are the distribution's current ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ cmake make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
COPY launch/install_horovod.sh launch/install_horovod.sh
# Horovod against torch's own NCCL (see the top of this file): the nvidia-nccl package's
# headers and libnccl.so.2 (plus the libnccl.so name CMake looks for).
RUN python -c "import sys, torch; assert sys.version.startswith('${PYTHON_VERSION}'), sys.version; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert torch.version.cuda" \
    && NVIDIA_DIR="$(python -c "import nvidia, os; print(list(nvidia.__path__)[0])")" \
    && NCCL_HEADER="$(find "${NVIDIA_DIR}" -name nccl.h -path '*nccl*' | head -n 1)" \
    && test -n "${NCCL_HEADER}" \
    && TORCH_NCCL_HOME="$(dirname "$(dirname "${NCCL_HEADER}")")" \
    && test -f "${TORCH_NCCL_HOME}/lib/libnccl.so.2" \
    && ln -sf libnccl.so.2 "${TORCH_NCCL_HOME}/lib/libnccl.so" \
    && HOROVOD_NCCL_HOME="${TORCH_NCCL_HOME}" HOROVOD_NCCL_LINK=SHARED \
       SECONDORDER_HOROVOD_GPU=nccl HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST}" \
       MAKEFLAGS="-j$(nproc)" bash launch/install_horovod.sh python \
    && python -c "import horovod.torch as hvd; assert hvd.nccl_built(), 'Horovod without NCCL'" \
    && mkdir -p /opt/dist \
    && find "${SECONDORDER_WHEEL_CACHE}" -name 'horovod-*.whl' -exec cp {} /opt/dist/ \; \
    && test -n "$(ls /opt/dist)"

# -- stage 2: the runtime image -------------------------------------------------------------------
FROM pytorch/pytorch:2.13.0-cuda13.2-cudnn9-runtime AS runtime

ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline

# A non-root user owns the project; the Python environment of the base image stays root-owned.
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid trainer --create-home --shell /bin/bash trainer

WORKDIR /workspace/secondorder

# Horovod: only the wheel built above (its runtime dependencies come from its metadata).
COPY --from=horovod-build /opt/dist/ /opt/dist/
# hadolint ignore=DL3013
RUN python -c "import sys, torch; assert sys.version.startswith('${PYTHON_VERSION}'), sys.version; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert torch.version.cuda" \
    && python -m pip install --no-cache-dir /opt/dist/horovod-*.whl \
    && rm -rf /opt/dist \
    && if ldconfig -p | grep -q libnccl; then echo "a system NCCL besides torch's" >&2; exit 1; fi \
    && python -c "import horovod.torch as hvd; assert hvd.nccl_built(), 'Horovod without NCCL'"

# The project (pip keeps the image's CUDA torch: pyproject.toml only asks torch>=2.1). DL3013:
# this installs the checkout itself, whose dependencies pyproject.toml bounds.
COPY --chown=trainer:trainer . .
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir ".[test]" \
    && python -c "import secondorder, horovod.torch, torch; print('torch', torch.__version__)"

USER 1000:1000
CMD ["launch/torchrun.sh", "--help"]
