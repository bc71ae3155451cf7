# secondorder on GPUs: PyTorch with CUDA and NCCL, the project, and Horovod built with NCCL GPU
# operations by launch/install_horovod.sh (the same script `make test` uses on CPU).
#
# Build (from the repository root; about 10 minutes, most of it compiling Horovod):
#   docker build -t secondorder:latest .
#
# Entry points (the image's working directory is the project; mount data and runs):
#   # torch.distributed over NCCL, one node with 8 GPUs
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD/runs":/workspace/secondorder/runs \
#       secondorder:latest launch/torchrun.sh model=resnet50 data=imagenet data.root=/data/imagenet
#   # Horovod over NCCL (gloo controller), 8 ranks on this node
#   docker run --gpus all --ipc=host ... secondorder:latest \
#       launch/horovodrun.sh -np 8 model=resnet50 data=imagenet data.root=/data/imagenet
#   # several nodes: launch/torchrun.sh with NNODES, NODE_RANK, MASTER_ADDR, RDZV_ID on each node
#   # (add --network=host), or launch/slurm/*.sbatch with the container; see launch/README.md.
#   # print the commands instead of running them:
#   docker run --rm secondorder:latest launch/torchrun.sh --dry-run --nproc 8
#
# The base image is pinned by tag: PyTorch 2.5.1 for CUDA 12.4 with cuDNN 9, the devel variant
# because Horovod compiles CUDA kernels with nvcc; its Python is 3.11 (pyproject.toml asks >=3.10
# and torch>=2.1; tests/test_dockerfile.py checks that these agree).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.5.1
# CUDA architectures Horovod's kernels are built for: A100 (8.0) and H100 (9.0).
ARG HOROVOD_BUILD_CUDA_CC_LIST=80,90

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    SECONDORDER_WHEEL_CACHE=/opt/secondorder/wheels

# A non-root user owns the project; the Python environment of the base image stays root-owned.
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid trainer --create-home --shell /bin/bash trainer

WORKDIR /workspace/secondorder

# Horovod first: it depends only on torch and the install script, so the long compile is cached
# across changes to the project's code.
COPY launch/install_horovod.sh launch/install_horovod.sh
RUN python -c "import sys, torch; assert sys.version.startswith('${PYTHON_VERSION}'), sys.version; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert torch.version.cuda" \
    && SECONDORDER_HOROVOD_GPU=nccl HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST}" \
       MAKEFLAGS="-j$(nproc)" bash launch/install_horovod.sh python \
    && python -c "import horovod.torch as hvd; assert hvd.nccl_built(), 'Horovod without NCCL'"

# The project (pip keeps the image's CUDA torch: pyproject.toml only asks torch>=2.1). DL3013:
# this installs the checkout itself, whose dependencies pyproject.toml bounds.
COPY --chown=trainer:trainer . .
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir ".[test]" \
    && python -c "import secondorder, horovod.torch, torch; print('torch', torch.__version__)"

USER 1000:1000
CMD ["launch/torchrun.sh", "--help"]
