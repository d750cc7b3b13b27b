#!/usr/bin/env bash
# Fill wheelhouse/ (beside the Dockerfile) for an air-gapped image build (docker build --build-arg WHEELHOUSE=1):
#   bash scripts/wheelhouse.sh cu126      # torch's CUDA flavour: cu126 (default), cu128, cu130 or cpu
# Run it where internet exists, on Linux x86_64 with Python 3.11 (the image's), then carry the folder.
# TORCH_INDEX_URL overrides the PyTorch index (a mirror; PyPI's own torch 2.14.1 is the cu130 build).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-cu126}
case "$flavour" in cu126 | cu128 | cu130 | cpu) ;; *) echo "flavour: cu126, cu128, cu130 or cpu" >&2; exit 2 ;; esac
py=${PYTHON:-python3}
dir=${WHEELHOUSE_DIR:-wheelhouse}
index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$flavour}
"$py" - <<'PY'
import platform, sys
if sys.version_info[:2] != (3, 11) or platform.system() != "Linux" or platform.machine() != "x86_64":
    sys.exit("the wheelhouse must be made with Python 3.11 on Linux x86_64 (the image's interpreter)")
PY
mkdir -p "$dir"
# torch first, from its flavour's index; the rest then finds it in the folder and takes no other build
"$py" -m pip download --dest "$dir" --index-url "$index" torch==2.14.1 torchvision==0.29.1
"$py" -m pip download --dest "$dir" --find-links "$dir" -r requirements.txt -r requirements-ray.txt
"$py" -m pip download --dest "$dir" --no-deps -r requirements-gliner.txt
du -sh "$dir"
