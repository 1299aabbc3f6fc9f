# CPU image running the deepfeat service. One process = one model copy; scale with replicas.
#   docker build -t deepfeat .
#   docker run -p 8000:8000 -v deepfeat-data:/data deepfeat
# For VGG16/ResNet weights, mount a torch hub cache at /models/torch (see README, "Weights").
FROM python:3.11-slim

# Optional: a PyTorch wheel index with CPU-only builds, for a much smaller image.
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/models/torch \
    DEEPFEAT_DATA_DIR=/data \
    DEEPFEAT_HOST=0.0.0.0 \
    DEEPFEAT_PORT=8000

WORKDIR /srv/deepfeat
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch==2.14.1 torchvision==0.29.1 --index-url "$TORCH_INDEX_URL"; \
    fi
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY index ./index
COPY scripts ./scripts
COPY deepfeat ./deepfeat
RUN pip install . \
    && useradd --system --uid 10001 --home /srv/deepfeat deepfeat \
    && mkdir -p /data /models/torch && chown deepfeat /data /models/torch

USER deepfeat
VOLUME ["/data", "/models/torch"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
CMD ["deepfeat", "serve"]
