"""Which LoRA files a run asks for and where they are found (no torch: the CLI and the worker use it).

A request's `loras` is a list of entries ``{"name", "expert", "strength"}`` (or the CLI's
``NAME[:high|low|both][:STRENGTH]``). Names are relative file names looked up in the LoRA folders:
``$WAN_LORA_DIRS`` (colon-separated), else ``<model root>/loras`` (WAN_CKPT_DIR, /runpod-volume) and
ComfyUI's ``models/loras`` folders, which the caller passes in.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from .model_sets import default_model_root
from .errors import InvalidParameter, did_you_mean

EXPERTS = ("high", "low", "both")
MAX_LORAS = 16
MAX_STRENGTH = 10.0
LORA_SUFFIXES = (".safetensors",)
# how messages name the folders (never their paths: a network caller reads them) and how a name is chosen
LORA_FOLDERS = "the LoRA folders (WAN_LORA_DIRS, else <model root>/loras and ComfyUI's models/loras)"
CHOOSE_LORA = ("give the name of a .safetensors file in one of them, relative to its folder (the operator puts the "
               "files there; docs/lora.md)")

# the 4-step distilled LoRAs as ComfyUI distributes them (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, loras/)
LIGHTX2V_HIGH = "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"
LIGHTX2V_LOW = "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a request: a file name, the expert(s) it applies to, its strength."""

    name: str
    expert: str = "both"
    strength: float = 1.0

    @property
    def strength_high(self) -> float:
        return self.strength if self.expert in ("high", "both") else 0.0

    @property
    def strength_low(self) -> float:
        return self.strength if self.expert in ("low", "both") else 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _strength(value: Any, field: str) -> float:
    if isinstance(value, bool):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(field, f"must be a number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, got {value!r}") from None
    if not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        raise InvalidParameter(field, f"must be a finite number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, got {number:g}")
    return number


def parse_entry(value: Any, field: str) -> LoraEntry:
    """An entry as an object {name, expert, strength} or the text NAME[:high|low|both][:STRENGTH]."""
    if isinstance(value, str):
        # from the right: a number is the strength, then high/low/both the expert; the rest is the name
        parts, expert, strength = value.strip().split(":"), "both", 1.0
        if len(parts) > 1 and _looks_numeric(parts[-1]):
            strength = parts.pop()
        if len(parts) > 1 and parts[-1].strip().lower() in EXPERTS:
            expert = parts.pop()
        elif len(parts) > 1 and parts[-2].strip().lower().endswith(LORA_SUFFIXES) and _a_word(parts[-1]):
            # `style.safetensors:hgih`: a word after the file's name is a misspelt expert, not part of the name
            raise InvalidParameter(f"{field}.expert", f"must be one of {'|'.join(EXPERTS)} in "
                                                      f"'NAME[:high|low|both][:STRENGTH]', got {parts[-1]!r}"
                                                      + did_you_mean(parts[-1].strip().lower(), EXPERTS, n=1, cutoff=0.5))
        value = {"name": ":".join(parts), "expert": expert, "strength": strength}
    if not isinstance(value, Mapping):
        raise InvalidParameter(field, f"must be an object {{name, expert, strength}} or 'NAME[:high|low|both][:STRENGTH]', got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - {"name", "expert", "strength"})
    if unknown:
        raise InvalidParameter(field, f"unknown key(s) {', '.join(unknown)} (known: name, expert, strength)")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip() or "\x00" in name or len(name) > 1024:
        raise InvalidParameter(f"{field}.name", f"must be a LoRA file name (1-1024 characters), got {value.get('name')!r}")
    expert = value.get("expert", "both")
    expert = expert.strip().lower() if isinstance(expert, str) else expert
    if expert not in EXPERTS:
        raise InvalidParameter(f"{field}.expert", f"must be one of {', '.join(EXPERTS)}, got {value.get('expert')!r}")
    strength = _strength(value.get("strength", 1.0), f"{field}.strength")
    return LoraEntry(name.strip(), expert, strength)


def _a_word(text: str) -> bool:
    """A part after a LoRA file's name that is not a path or another file's name (an expert, maybe misspelt)."""
    return not any(c in text for c in "/\\.") and bool(text.strip())


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("nan", "inf", "-inf", "+inf")


def parse_entries(value: Any, field: str = "loras") -> Tuple[LoraEntry, ...]:
    """A list of entries (a single entry is taken as a list of one); at most MAX_LORAS."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) > MAX_LORAS:
        raise InvalidParameter(field, f"has {len(items)} entries; at most {MAX_LORAS} LoRAs are applied at once")
    problems, entries = [], []
    for index, item in enumerate(items):
        try:
            entries.append(parse_entry(item, f"{field}[{index}]"))
        except InvalidParameter as exc:
            problems += exc.problems
    if problems:
        raise InvalidParameter.from_problems(problems)
    return tuple(entries)


def check_relative_name(name: str, field: str) -> str:
    """A name a network caller may give: relative, inside its folder (no absolute path, no '..')."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":"):
        raise InvalidParameter(field, f"{name!r} must be a file name relative to a LoRA folder (no absolute path, no '..')")
    if not name.lower().endswith(LORA_SUFFIXES):
        raise InvalidParameter(field, f"{name!r} must be a .safetensors file")
    return str(path)


def lora_dirs(extra: Iterable[os.PathLike] = (), environ: Optional[Mapping[str, str]] = None) -> List[Path]:
    """The LoRA folders, in search order: WAN_LORA_DIRS when set, else <model root>/loras and `extra`
    (ComfyUI's loras folders)."""
    environ = os.environ if environ is None else environ
    configured = environ.get("WAN_LORA_DIRS", "").strip()
    if configured:
        return [Path(p) for p in configured.split(":") if p.strip()]
    folders = [default_model_root() / "loras", *map(Path, extra)]
    unique: List[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def list_lora_files(folders: Sequence[Path]) -> List[str]:
    """Relative names of the .safetensors files under `folders` (the first folder wins for a name)."""
    names: List[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                name = path.relative_to(folder).as_posix()
                if name not in names:
                    names.append(name)
    return names


def resolve_lora(name: str, folders: Sequence[Path], field: str) -> Path:
    """The file `name` (relative) names in the first folder that has it, never outside that folder."""
    from .files import within

    relative = check_relative_name(name, field)
    for folder in folders:
        candidate = folder / relative
        if candidate.is_file() and within(candidate, [folder]):
            return candidate.resolve()
    raise InvalidParameter(field, f"no LoRA file {name!r} in {LORA_FOLDERS}; {CHOOSE_LORA}")
