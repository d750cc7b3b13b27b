"""Where a transformers checkpoint's files are, offline: a save_pretrained() folder or the Hugging Face cache.

Shared by every family that loads transformers models (NER, SAM, open-vocabulary detection): nothing
here touches the network; `python -m serving weights download` (or the Docker build) fills the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A hub id is "name" or "org/name"; anything else is never looked up in the cache.
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def local_folder(source: str, model_dir: str = "") -> Path | None:
    """Return a save_pretrained() folder (with config.json) for `source`: a path, or a name under MODEL_DIR."""
    candidates = [Path(source).expanduser()]
    if model_dir and not Path(source).is_absolute():
        root = Path(model_dir)
        candidates += [root / source, root / source.rsplit("/", 1)[-1]]
    for folder in candidates:
        try:
            if folder.is_dir() and (folder / "config.json").is_file():
                return folder
        except OSError:
            continue
    return None


def hf_cached(repo_id: str, filename: str) -> str | None:
    """Return the Hugging Face cache path of one file of a repo when it is cached (never the network)."""
    if not _REPO_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:
        return None
    return found if isinstance(found, str) else None


def checkpoint_folder(source: str, model_dir: str = "") -> Path | None:
    """Return the folder holding `source`'s config.json: a local folder first, else the cache snapshot."""
    folder = local_folder(source, model_dir)
    if folder is not None:
        return folder
    cached = hf_cached(source, "config.json")
    return Path(cached).parent if cached else None


def weights_file(folder: Path) -> Path | None:
    """Return the weights file of a checkpoint folder (safetensors first), or None."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def folder_version(name: str, folder: Path | None) -> str:
    """Return `name@<fingerprint of the checkpoint folder>`, or `name@missing` without its weights file."""
    from serving.contract import weights_fingerprint

    if folder is None or weights_file(folder) is None:
        return f"{name}@missing"
    return f"{name}@{weights_fingerprint(folder)}"
