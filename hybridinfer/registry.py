"""Model name -> local folder: a path, $HYBRIDINFER_MODELS/<name>, or the Hugging Face cache."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HybridInferError

# Known short names -> Hugging Face repository ids.
KNOWN = {
    "TurboSparse-Mixtral": "PowerInfer/TurboSparse-Mixtral",
    "TurboSparse-Mixtral-Instruct": "PowerInfer/TurboSparse-Mixtral-Instruct",
    "TurboSparse-Mistral-Instruct": "PowerInfer/TurboSparse-Mistral-Instruct",
    "ReluLLaMA-7B": "SparseLLM/ReluLLaMA-7B",
    "ProSparse-Llama-2-7B": "SparseLLM/prosparse-llama-2-7b",
    "Bamboo-7B": "PowerInfer/Bamboo-base-v0_1",
}


def hf_hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve(model: str | os.PathLike) -> Path:
    """The folder holding config.json for `model` (a folder, a known name, or ORG/NAME)."""
    model = str(model)
    looked = []
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    looked.append(str(p))
    name = next((k for k in KNOWN if k.lower() == model.lower()), model)
    # ORG/NAME is a hub id; anything else with a slash (/abs, ./rel, a/b/c) is a path that is not there
    repo = KNOWN.get(name) or (model if re.fullmatch(r"[\w.-]+/[\w.-]+", model) else None)
    root = os.environ.get("HYBRIDINFER_MODELS")
    if root and (repo or "/" not in model):           # names, not paths, live under the root
        for cand in dict.fromkeys((Path(root) / name, Path(root) / (repo or name).split("/")[-1])):
            if (cand / "config.json").is_file():
                return cand
            looked.append(str(cand))
    if repo:
        snaps = hf_hub_dir() / f"models--{repo.replace('/', '--')}" / "snapshots"
        found = sorted((s for s in snaps.glob("*") if (s / "config.json").is_file()),
                       key=lambda s: s.stat().st_mtime, reverse=True)
        if found:
            return found[0]
        looked.append(str(snaps))
    how = (f"download it with `huggingface-cli download {repo}` or put it in $HYBRIDINFER_MODELS/{name}"
           if repo else "known names: " + ", ".join(KNOWN))
    raise HybridInferError(f"model {model!r} not found (looked in: {', '.join(looked)}); {how}")
