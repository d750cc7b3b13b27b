# Label Studio ML backend: Debian bookworm with Python 3.11, torch from the PyTorch index of the CUDA
# flavour chosen below (its wheels bring their own CUDA libraries, so the base has no second CUDA copy),
# non-root, models loaded in each gunicorn worker after the fork (no --preload).
#
#   docker build -t ls-ml-server .                                # cu126: NVIDIA driver >= 525
#   docker build --build-arg TORCH_CUDA=cu128 -t ls-ml-server .   # cu128: driver >= 570 (Blackwell GPUs need it)
#   docker build --build-arg TORCH_CUDA=cu130 -t ls-ml-server .   # cu130: driver >= 580 (PyPI's default torch)
#   docker build --build-arg TORCH_CUDA=cpu -t ls-ml-server .     # no CUDA libraries at all
# Air-gapped (no internet at build time): `bash scripts/wheelhouse.sh cu126` where internet exists fills
# ./wheelhouse, then --build-arg WHEELHOUSE=1 installs from it alone (pip --no-index --find-links), and
# --build-arg WEIGHTS=0 skips the weights download (mount them at /data/weights instead: README "Docker").
# The apt step needs a Debian mirror; BASE may name a local image that has those packages already.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# cu126 | cu128 | cu130 | cpu: which CUDA build of torch 2.14.1 / torchvision 0.29.1 (pinned as in requirements.txt)
ARG TORCH_CUDA=cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
# 1: pip installs from ./wheelhouse only (bind-mounted while pip runs, never a layer of the image)
ARG WHEELHOUSE=0
# 0: no weights in the image (a volume at /data/weights brings them)
ARG WEIGHTS=1

LABEL org.opencontainers.image.title="ls-ml-server" \
      ls-ml-server.torch-cuda="${TORCH_CUDA}"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/model_dir \
    TORCH_HOME=/data/weights/torch \
    HF_HOME=/data/weights/hf \
    EASYOCR_MODULE_PATH=/data/weights/easyocr \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Tesseract's English data for the OCR engine (tesserocr's wheel brings the library); curl for the
# health check. Skipped when the base has them already (an air-gapped base made with mmdebstrap).
RUN if ! dpkg -s tesseract-ocr tesseract-ocr-eng curl >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            tesseract-ocr tesseract-ocr-eng curl \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-ray.txt requirements-gliner.txt ./
# torch first, alone, from its flavour's index (WHEELHOUSE=1: from ./wheelhouse alone), so no other
# requirement can pull a different build;
# GLiNER without its deps (it declares an older transformers; requirements-gliner.txt says why);
# ray[data] too: the same image serves, runs batch jobs and joins a Ray cluster (docs/SCALING.md).
# The last line fails the build when the installed torch is not the flavour asked for.
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ "$WHEELHOUSE" = 1 ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
    && pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1 \
    && pip install -r requirements.txt -r requirements-ray.txt \
    && pip install --no-deps -r requirements-gliner.txt \
    && python -c "import sys, torch; cuda = torch.version.cuda; want = sys.argv[1]; \
got = 'cpu' if cuda is None else 'cu' + cuda.replace('.', ''); print('torch', torch.__version__, got); \
sys.exit(0 if got == want else f'torch is {got}, TORCH_CUDA={want}')" "$TORCH_CUDA"

RUN useradd --create-home --uid 1000 lsml \
    && mkdir -p /data/model_dir /data/weights \
    && chown -R lsml:lsml /data
COPY --chown=lsml:lsml backends/ backends/
COPY --chown=lsml:lsml serving/ serving/
COPY --chown=lsml:lsml model.py _wsgi.py gunicorn.conf.py ./
USER 1000

# The default weights (torchvision, Hugging Face) into the image, the zero-shot families' included, so any
# project's own labels are served out of the box; the language models (llm, vlm: several GB) are fetched
# by name where wanted. WEIGHTS=0 leaves them all to a volume.
RUN if [ "$WEIGHTS" = 1 ]; then \
        python -m serving weights download \
            --model fasterrcnn_resnet50_fpn_v2 --model maskrcnn_resnet50_fpn_v2 --model keypointrcnn_resnet50_fpn \
            --model deeplabv3_resnet50 --model resnet50 --model dslim/bert-base-NER \
            --model facebook/sam2.1-hiera-tiny --model grounding_dino --model owlv2 --model dfine_l \
            --model siglip2 --model nli --model urchade/gliner_multi-v2.1 --model deepset/roberta-base-squad2 \
            --model clap --model whisper; \
    else echo "WEIGHTS=0: no weights in the image, mount them at /data/weights"; fi

VOLUME ["/data/model_dir"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/health || exit 1"]

# No --preload: each worker loads its models after the fork (CUDA does not survive fork).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
