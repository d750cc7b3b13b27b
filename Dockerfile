# Label Studio ML backend on a CUDA runtime, Python 3.11, non-root, default weights baked in.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/model_dir \
    TORCH_HOME=/data/weights/torch \
    HF_HOME=/data/weights/hf \
    EASYOCR_MODULE_PATH=/data/weights/easyocr \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8

RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common curl \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential pkg-config \
        tesseract-ocr tesseract-ocr-eng libtesseract-dev libleptonica-dev libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-ray.txt ./
# ray[data] too: the same image serves, runs batch jobs and joins a Ray cluster as a worker (docs/SCALING.md)
RUN pip install --upgrade pip \
    && pip install torch==2.14.1 torchvision==0.29.1 \
    && pip install -r requirements.txt -r requirements-ray.txt

RUN useradd --create-home --uid 1000 lsml \
    && mkdir -p /data/model_dir /data/weights \
    && chown -R lsml:lsml /data
COPY --chown=lsml:lsml . /app
USER 1000

# Internet exists at build time: fetch the default weights into the image.
RUN python -m serving weights download \
        --model fasterrcnn_resnet50_fpn_v2 --model maskrcnn_resnet50_fpn_v2 --model keypointrcnn_resnet50_fpn \
        --model deeplabv3_resnet50 --model resnet50 --model dslim/bert-base-NER \
        --model facebook/sam2.1-hiera-tiny --model grounding_dino --model owlv2

VOLUME ["/data/model_dir"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/health || exit 1"]

# No --preload: each worker loads its models after the fork (CUDA does not survive fork).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "_wsgi:app"]
