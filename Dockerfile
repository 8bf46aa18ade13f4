# syntax=docker/dockerfile:1
# The training image: `ddpm launch` (torchrun over `python -m trainer train`) as a non-root user.
#
# Base: Debian slim with CPython 3.11 (the version the project is tested with), pinned to an exact tag.
# CUDA comes from the torch==2.14.1 wheel itself: PyPI's Linux x86_64 torch wheels are CUDA builds and pull in
# the matching nvidia-* runtime libraries (cuDNN, NCCL, cuBLAS), so the only thing the GPU node must supply is
# the NVIDIA driver (mounted by the device plugin). A separate CUDA base would duplicate those libraries.
# Pin the digest too when you publish (FROM python:3.11.14-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a venv with the pinned dependencies and the project ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, exactly as pinned (the same two pins the Makefile installs); its layer is cached across code edits.
RUN pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
# pyproject.toml pins every other runtime dependency.
RUN pip install .

# ---- tensorboard: `docker build --target tensorboard` -----------------------------------------------------
# TensorBoard alone (pinned as pyproject.toml pins it), no torch/CUDA: a few hundred MB instead of several GB to
# pull onto the CPU node that serves it (the chart's tensorboard.image). Same non-root user as the trainer, so the
# volume's files are readable with the same fsGroup.
FROM ${PYTHON_IMAGE} AS tensorboard
ARG UID=1000
ARG GID=1000
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN groupadd --gid "${GID}" ddpm \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/ddpm --shell /usr/sbin/nologin ddpm \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install tensorboard==2.21.0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/ddpm
USER ${UID}:${GID}
EXPOSE 6006
ENTRYPOINT ["tensorboard"]

# ---- runtime (the default target: the training image) -----------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG UID=1000
ARG GID=1000
# A fixed numeric uid/gid: the chart's securityContext (runAsUser/runAsGroup/fsGroup 1000) matches it, and
# Kubernetes can check runAsNonRoot against a number.
RUN groupadd --gid "${GID}" ddpm \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/ddpm --shell /usr/sbin/nologin ddpm \
 && mkdir -p /data \
 && chown "${UID}:${GID}" /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf-cache \
    HF_HUB_DISABLE_TELEMETRY=1
# /data is where the chart mounts the shared volume (outputs, checkpoints, TensorBoard logs, HF cache).
VOLUME ["/data"]
WORKDIR /home/ddpm
USER ${UID}:${GID}
# `ddpm launch` reads torchrun's PET_* variables (or JOB_COMPLETION_INDEX) and the config from DDPM_CONFIG_FILE.
ENTRYPOINT ["ddpm", "launch"]
