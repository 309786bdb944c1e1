# hetsp GPU image for real clusters: CUDA 12.8, PyTorch, flash-attn, DeepSpeed, NCCL, and this project.
#
# Build:  docker build -t hetsp .
# Run:    docker run --gpus all --ipc=host --network=host -v $PWD/runs:/opt/hetsp/runs hetsp --simulate 1 configs/default.toml
# Multi-node: run the image on every node with --nnodes/--node-rank/--rdzv-endpoint (see the README).
# --ipc=host (or a large --shm-size) is needed by NCCL and the data loader; --network=host by multi-node NCCL.
#
# Not built on the development machine (it has no Docker engine). Versions checked to exist together:
#   base pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel (torch 2.8.0+cu128, triton 3.4.0, Python 3.11 expected and checked below, nvcc for
#   DeepSpeed's just-in-time ops), flash-attn 2.8.3 (its release publishes cu12 / torch 2.8 / cxx11abiTRUE wheels,
#   which its setup downloads instead of compiling), deepspeed 0.19.8 and transformers 5.24.0 (the versions the
#   test suite passes with on CPU; transformers 5 needs torch >= 2.6). torch 2.8 is inside the project's range
#   (>=2.4,<2.15); the CPU suite runs on torch 2.13.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel

ARG FLASH_ATTN_VERSION=2.8.3
ARG DEEPSPEED_VERSION=0.19.8
ARG TRANSFORMERS_VERSION=5.24.0

# MAX_JOBS: compile jobs of a flash-attn source build (only if its prebuilt wheel cannot be fetched).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    MAX_JOBS=8

# hetsp reads TOML with tomllib (Python >= 3.11): fail the build here, not at the first run.
RUN python -c "import sys, torch; assert sys.version_info >= (3, 11), sys.version; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# flash-attn and DeepSpeed (sdists) import the installed torch in their setup, hence no build isolation;
# DeepSpeed's CUDA ops are then compiled just in time, on first use, with the image's nvcc.
RUN pip install packaging ninja psutil einops setuptools wheel \
 && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
 && pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && pip install "transformers==${TRANSFORMERS_VERSION}"

WORKDIR /opt/hetsp
COPY . .
# The already installed torch, triton, flash-attn, DeepSpeed and transformers satisfy the project's ranges.
# The check reads versions without importing the CUDA extensions (no GPU driver during a build).
RUN pip install ".[test,gpu]" \
 && python -c "from importlib.metadata import version as v; import hetsp, hetsp.config; print('hetsp image:', *(f'{p} {v(p)}' for p in ('torch', 'triton', 'flash-attn', 'deepspeed', 'transformers', 'hetsp')))"

ENTRYPOINT ["hetsp-launch"]
CMD ["--help"]
