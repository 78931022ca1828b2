# speedrun-plm on a pinned CUDA PyTorch base (torch 2.11, CUDA 12.8, cuDNN 9; inside pyproject's torch range,
# so the install below keeps the image's torch). For a byte-identical base, append the digest you pulled:
# FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime@sha256:<digest>
#
# Build:   docker build -t speedrun-plm .
# Run:     mkdir -p outputs
#          docker run --rm --gpus all --ipc=host -v "$PWD/outputs:/app/outputs" -v /path/to/shards:/data:ro \
#              speedrun-plm experiment=reference data=local data.path=/data
#          docker run --rm speedrun-plm                        # the CPU quick start on the embedded sample
#          docker run ... speedrun-plm -m model.tie_embeddings=true,false      # Hydra args go straight to launch.py
#          docker run --rm speedrun-plm --help
# Secrets: pass them by NAME so their values come from your shell and appear nowhere else
#          (not in the image, the command line, `docker inspect` of the image, or the run directory):
#              docker run -e HF_TOKEN -e WANDB_API_KEY ... speedrun-plm ...
#          (W&B with no network: add -e WANDB_MODE=offline, then `wandb sync outputs/.../wandb/offline-run-*`.)
#          Never put a token in this file, in --build-arg, or after `-e NAME=` on a shared machine.
# The container runs as the unprivileged user `speedrun` (uid 10001); for a bind mount owned by another
# uid add `--user "$(id -u):$(id -g)"` (the caches under /home/speedrun/.cache stay writable).
# Multi-GPU runs need shared memory for NCCL: --ipc=host (or --shm-size=16g).
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/speedrun \
    HF_HOME=/home/speedrun/.cache/huggingface \
    SPEEDRUN_CACHE=/home/speedrun/.cache/speedrun-plm

RUN useradd --create-home --uid 10001 --shell /bin/bash speedrun \
    && mkdir -p /app /home/speedrun/.cache \
    && chown -R speedrun:speedrun /app /home/speedrun \
    && chmod 1777 /home/speedrun/.cache

WORKDIR /app
COPY --chown=speedrun:speedrun . /app

# The README's install command (quick start), run as root so the editable install can register itself
# in the image's site-packages; the source tree stays owned by `speedrun`.
RUN pip install -e ".[dev]" \
    && chown -R speedrun:speedrun /app

USER speedrun

ENTRYPOINT ["python", "launch.py"]
