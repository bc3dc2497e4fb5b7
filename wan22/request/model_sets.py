"""Find a Wan2.2 I2V-A14B model set on disk and tell which layout it is in.

Layouts (see README "Model layouts"):
- upstream:  the Wan-AI/Wan2.2-I2V-A14B folder that upstream generate.py reads;
- diffusers: the Wan-AI/Wan2.2-I2V-A14B-Diffusers folder;
- comfyui:   ComfyUI's split single files under diffusion_models/, text_encoders/, vae/ (fp16, bf16 or fp8_scaled).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .errors import ModelFolderError

DEFAULT_MODEL_ROOT = Path("/workspace/models")
RUNPOD_VOLUME = Path("/runpod-volume")

UPSTREAM_PARTS = {
    "high_noise_model": "high_noise_model/ (config.json + *.safetensors)",
    "low_noise_model": "low_noise_model/ (config.json + *.safetensors)",
    "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "vae": "Wan2.1_VAE.pth",
    "tokenizer": "google/umt5-xxl/",
}
DIFFUSERS_PARTS = {
    "index": "model_index.json",
    "high_noise_model": "transformer/",
    "low_noise_model": "transformer_2/",
    "text_encoder": "text_encoder/",
    "tokenizer": "tokenizer/",
    "vae": "vae/",
}
COMFYUI_PARTS = {
    "high_noise_model": "diffusion_models/*i2v*high_noise*.safetensors",
    "low_noise_model": "diffusion_models/*i2v*low_noise*.safetensors",
    "text_encoder": "text_encoders/umt5_xxl*.safetensors",
    "vae": "vae/wan_2.1_vae*.safetensors",
}
LAYOUT_PARTS = {"upstream": UPSTREAM_PARTS, "diffusers": DIFFUSERS_PARTS, "comfyui": COMFYUI_PARTS}


@dataclasses.dataclass(frozen=True)
class ModelSet:
    """One loadable set: both experts, the text encoder (+ tokenizer) and the VAE."""

    layout: str
    root: Path
    files: Dict[str, Path]  # part name -> file or folder
    variant: str = ""  # comfyui only: which precision of the split files

    @property
    def name(self) -> str:
        return f"{self.root} [{self.layout}{' ' + self.variant if self.variant else ''}]"

    def as_plain(self) -> dict:
        """Strings only (what a rank process is sent: wan22.parallel); from_plain reads it back."""
        return {"layout": self.layout, "root": str(self.root), "variant": self.variant,
                "files": {part: str(path) for part, path in self.files.items()}}

    @classmethod
    def from_plain(cls, plain: dict) -> "ModelSet":
        return cls(plain["layout"], Path(plain["root"]), {part: Path(path) for part, path in plain["files"].items()},
                   plain["variant"])


def default_model_root() -> Path:
    """`$WAN_CKPT_DIR` (default /workspace/models); when that folder is missing and /runpod-volume exists,
    /runpod-volume (the seed's rule)."""
    configured = Path(os.environ.get("WAN_CKPT_DIR") or DEFAULT_MODEL_ROOT)
    if not configured.exists() and RUNPOD_VOLUME.exists():
        return RUNPOD_VOLUME
    return configured


def _dir_with(path: Path, suffix: str) -> bool:
    return path.is_dir() and any(p.name.endswith(suffix) for p in path.iterdir())


def _upstream_files(root: Path) -> Dict[str, Optional[Path]]:
    def expert(name):
        folder = root / name
        return folder if (folder / "config.json").is_file() and _dir_with(folder, ".safetensors") else None

    tokenizer = root / "google" / "umt5-xxl"
    return {
        "high_noise_model": expert("high_noise_model"),
        "low_noise_model": expert("low_noise_model"),
        "text_encoder": root / UPSTREAM_PARTS["text_encoder"] if (root / UPSTREAM_PARTS["text_encoder"]).is_file() else None,
        "vae": root / UPSTREAM_PARTS["vae"] if (root / UPSTREAM_PARTS["vae"]).is_file() else None,
        "tokenizer": tokenizer if tokenizer.is_dir() and any(tokenizer.iterdir()) else None,
    }


def _diffusers_files(root: Path) -> Dict[str, Optional[Path]]:
    def component(sub, weights=True):
        folder = root / sub
        ok = folder.is_dir() and (not weights or ((folder / "config.json").is_file() and _dir_with(folder, ".safetensors")))
        return folder if ok else None

    return {
        "index": root / "model_index.json" if (root / "model_index.json").is_file() else None,
        "high_noise_model": component("transformer"),
        "low_noise_model": component("transformer_2"),
        "text_encoder": component("text_encoder"),
        "tokenizer": component("tokenizer", weights=False) if (root / "tokenizer").is_dir() and any((root / "tokenizer").iterdir()) else None,
        "vae": component("vae"),
    }


def _variant_of(path: Path) -> str:
    name = path.name.lower()
    for variant in ("fp8_scaled", "fp8_e4m3fn_scaled", "bf16", "fp16"):
        if variant in name:
            return "fp8_scaled" if variant.startswith("fp8") else variant
    return ""


def _comfyui_candidates(root: Path) -> Dict[str, List[Path]]:
    def matches(sub: str, *needles: str, prefix: str = "") -> List[Path]:
        folder = root / sub
        if not folder.is_dir():
            return []
        return sorted(
            p for p in folder.iterdir()
            if p.suffix == ".safetensors" and p.name.lower().startswith(prefix) and all(n in p.name.lower() for n in needles)
        )

    return {
        "high_noise_model": matches("diffusion_models", "i2v", "high_noise"),
        "low_noise_model": matches("diffusion_models", "i2v", "low_noise"),
        "text_encoder": matches("text_encoders", prefix="umt5_xxl"),
        "vae": matches("vae", prefix="wan_2.1_vae"),
    }


def _pick(candidates: Sequence[Path], variant: str) -> Optional[Path]:
    """Prefer the file of the requested variant; without one, the highest precision present."""
    if not candidates:
        return None
    if variant:
        for path in candidates:
            if _variant_of(path) == variant:
                return path
    order = {"fp16": 0, "bf16": 1, "": 2, "fp8_scaled": 3}
    return sorted(candidates, key=lambda p: order.get(_variant_of(p), 2))[0]


def _comfyui_files(root: Path, variant: str = "") -> Dict[str, Optional[Path]]:
    candidates = _comfyui_candidates(root)
    files = {part: _pick(paths, variant) for part, paths in candidates.items()}
    return files


def _found_summary(root: Path) -> str:
    """How much the folder holds, never what: its names may be other users' files (the worker's output folder)."""
    if not root.is_dir():
        return "nothing (the folder does not exist)"
    entries = list(root.iterdir())
    folders = sum(p.is_dir() for p in entries)
    return f"{len(entries) - folders} files and {folders} folders" if entries else "nothing (empty folder)"


# how a message names the folder WAN_CKPT_DIR chose: network callers never see the path
CKPT_FOLDER = "the model folder (WAN_CKPT_DIR)"


def discover_model_set(path: os.PathLike | str, variant: str = "", label: str = "") -> ModelSet:
    """Detect the layout of `path` and return its parts; raise ModelFolderError saying what is missing, naming the
    folder `label` (e.g. CKPT_FOLDER) or, without one, its path (a folder the caller gave)."""
    root = Path(path).expanduser()
    label = label or f"model folder {root}"
    if not root.is_dir():
        raise ModelFolderError(
            f"{label} does not exist (set WAN_CKPT_DIR or the loader's model_path; "
            f"default /workspace/models, fallback /runpod-volume)"
        )
    detectors = {"upstream": _upstream_files, "diffusers": _diffusers_files, "comfyui": lambda r: _comfyui_files(r, variant)}
    scored = []
    for layout, detect in detectors.items():
        files = detect(root)
        if all(files.values()):
            chosen_variant = ""
            if layout == "comfyui":
                chosen_variant = _variant_of(files["high_noise_model"])
            return ModelSet(layout=layout, root=root, files={k: v for k, v in files.items()}, variant=chosen_variant)
        scored.append((sum(v is not None for v in files.values()), layout, files))
    scored.sort(key=lambda item: -item[0])
    best_count, best_layout, best_files = scored[0]
    layouts = "; ".join(f"{name}: {', '.join(parts.values())}" for name, parts in LAYOUT_PARTS.items())
    if best_count == 0:
        raise ModelFolderError(
            f"{label} holds no Wan2.2 I2V-A14B model set. Looked for the layouts {layouts}. It holds {_found_summary(root)}, none a part of those layouts."
        )
    missing = [LAYOUT_PARTS[best_layout][part] for part, found in best_files.items() if found is None]
    present = [LAYOUT_PARTS[best_layout][part] for part, found in best_files.items() if found is not None]
    raise ModelFolderError(
        f"{label} looks like the {best_layout} layout but is incomplete: found {', '.join(present)}; "
        f"missing {', '.join(missing)}. The folder holds {_found_summary(root)}."
    )


def list_model_sets(roots: Iterable[os.PathLike | str]) -> List[ModelSet]:
    """Every complete model set in each root and its direct subfolders (ComfyUI: one per precision)."""
    found: List[ModelSet] = []
    seen = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
            variants = sorted({_variant_of(p) for p in _comfyui_candidates(folder)["high_noise_model"]}) or [""]
            for variant in variants:
                try:
                    model_set = discover_model_set(folder, variant)
                except ModelFolderError:
                    continue
                key = (model_set.root.resolve(), model_set.layout, model_set.variant)
                if key not in seen:
                    seen.add(key)
                    found.append(model_set)
    return found
