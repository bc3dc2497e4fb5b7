"""Prompt extension, as upstream's generate.py --use_prompt_extend does for image-to-video: a vision-language model
looks at the reference image and the user's short prompt and writes the detailed, camera-aware video description
the text encoder then gets.

- `local_qwen`: Qwen2.5-VL through transformers, from a local folder only (never a download): `prompt_extend_model`
  is one of upstream's names (QwenVL2.5_7B, QwenVL2.5_3B) or a folder name, looked up under the model roots.
- `dashscope`: Alibaba Cloud's multimodal generation API (`qwen-vl-max` by default), `DASH_API_KEY` and
  `DASH_API_URL`, at most `DASH_API_TIMEOUT_S` (60) seconds, the image sent inline.

As upstream, a failed extension falls back to the original prompt (the reason is reported); strict mode makes it
an error instead. Generation is seeded with the request's seed, at most 512 new tokens.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from .request import spec
from .request.extension_models import LOCAL_FOLDERS, check_model_name, model_name
from .request.errors import InvalidParameter, Wan22Error

log = logging.getLogger("wan22")

MODEL_SUBFOLDERS = ("", "prompt_extend", "LLM")  # under each model root
MAX_NEW_TOKENS = 512
DASHSCOPE_URL = "https://dashscope.aliyuncs.com/api/v1/services/aigc/multimodal-generation/generation"
DASHSCOPE_TIMEOUT_S = 60.0
DASHSCOPE_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # e.g. InvalidApiKey, Throttling.RateQuota

# our own wording, with upstream's intent: keep what the image shows, say what moves and how the camera moves
SYSTEM_PROMPTS = {
    "en": ("You turn a short request for an image-to-video model into one detailed video description. Look at the "
           "image first and keep its subject, setting, style, lighting and composition. Then say what moves, how it "
           "moves, and how the camera moves (static, pan, tilt, dolly, orbit or zoom). Keep every detail the request "
           "gives and invent nothing that contradicts the image; no captions or on-screen text. Write one paragraph "
           "of 80 to 120 words in English and answer with the description only."),
    "zh": ("你把给图生视频模型的一句简短要求改写成一段详细的视频描述。先看图片，保留其中的主体、场景、风格、光线和构图；"
           "再写清楚什么在动、怎样动，以及镜头怎样运动（固定、横摇、俯仰、推拉、环绕或变焦）。保留要求中的每个细节，"
           "不编造与图片矛盾的内容，不加字幕或画面文字。用一段80到150字的中文，只回答这段描述。"),
}


class PromptExtendFailed(Wan22Error):
    """Strict mode: the extension failed (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Extension:
    prompt: str   # what the text encoder gets
    status: str   # "extended", or "fallback: <why>" (the original prompt is used)
    method: str
    model: str
    device: str = ""  # where a local model wrote it (cpu when the GPU had no room); "remote" for DashScope

    def as_dict(self) -> Dict[str, str]:
        return dataclasses.asdict(self)


MODEL_ROOTS = "the model roots (WAN_CKPT_DIR and ComfyUI's models folder)"  # as messages name them: never a path
QWEN_MODEL_TYPE = "qwen2_5_vl"
MAX_CONFIG_BYTES = 1024 * 1024


def qwen_vl_kind(folder: Path) -> str:
    """'' when `folder`'s config.json is a Qwen2.5-VL one (model_type qwen2_5_vl, or an architecture
    Qwen2_5_VL...); otherwise what the folder is instead, as a message says it."""
    try:
        with open(folder / "config.json", "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        config = json.loads(raw) if len(raw) <= MAX_CONFIG_BYTES else None
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        return "its config.json is not a readable model configuration"
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    architectures = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    if model_type == QWEN_MODEL_TYPE or any(a.startswith("Qwen2_5_VL") for a in architectures):
        return ""
    kind = model_type if isinstance(model_type, str) and model_type else \
        (architectures[0] if architectures else config.get("_class_name"))
    shown = repr(kind[:64]) if isinstance(kind, str) and kind else "none given"
    return f"its config.json names model type {shown}"


def find_local_model(name: str, roots: Iterable[Path]) -> Path:
    """The Qwen2.5-VL folder for `name` (upstream's name or a folder name) under the model roots: the first folder
    of that name with a config.json that is a Qwen2.5-VL one (any other model, e.g. an expert's folder, is refused:
    it must never reach from_pretrained)."""
    folder = LOCAL_FOLDERS.get(check_model_name(name), name)
    other = ""
    for root in [Path(r) for r in roots]:
        for sub in MODEL_SUBFOLDERS:
            candidate = root / sub / folder
            if (candidate / "config.json").is_file():
                kind = qwen_vl_kind(candidate)
                if not kind:
                    return candidate
                other = other or kind
    if other:
        raise InvalidParameter("prompt_extend_model", f"{name}: the folder {folder} is not a Qwen2.5-VL model ({other}; "
                                                      f"expected model_type {QWEN_MODEL_TYPE!r}); give "
                                                      f"{' or '.join(LOCAL_FOLDERS)}, or the name of a Qwen2.5-VL "
                                                      f"folder under {MODEL_ROOTS}")
    where = ", ".join(f"<root>/{sub + '/' if sub else ''}{folder}" for sub in MODEL_SUBFOLDERS)
    raise InvalidParameter("prompt_extend_model", f"{name}: no {folder} folder with a config.json under {MODEL_ROOTS}; "
                                                  f"looked at {where}")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class LocalQwenExpander:
    """Qwen2.5-VL from a local folder, loaded once and kept (the caller holds it); `to("cpu")` takes it off the GPU
    before an expert needs the memory."""

    def __init__(self, folder: Path, device: str = "cpu", dtype=None):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.folder, self.device = Path(folder), device
        if dtype is None:  # bf16 (16 GB for 7B) where a GPU will run it, fp32 for a CPU-only machine
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), local_files_only=True,
                                                                            dtype=dtype).to(device).eval()
        except Exception as exc:  # its text may hold the folder's path: the log gets it, the caller the kind
            log.warning("prompt extension: %s cannot be loaded: %s", self.folder, exc)
            raise InvalidParameter("prompt_extend_model", f"{self.folder.name}: not a readable Qwen2.5-VL folder "
                                                          f"({type(exc).__name__})") from exc

    def to(self, device: str) -> "LocalQwenExpander":
        self.model.to(device)
        self.device = device
        return self

    def fits(self, device: str) -> bool:
        """Whether the model and its generation fit the GPU's free memory now (else it writes on the CPU:
        minutes for 512 tokens of a 7B model instead of seconds)."""
        import torch

        from .memory.placement import module_bytes

        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            return False
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free >= module_bytes(self.model) + 2 * 1024**3

    def expand_on(self, device: str, image, prompt: str, lang: str, seed: int):
        """(text, the device it was written on): on `device` when it fits there, then back to the CPU (kept warm
        in RAM, out of the experts' way), else on the CPU."""
        where = device if device != "cpu" and self.fits(device) else "cpu"
        try:
            return self.to(where).expand(image, prompt, lang, seed), where
        finally:
            if where != "cpu":
                self.to("cpu")

    def expand(self, image, prompt: str, lang: str, seed: int) -> str:
        import torch

        messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPTS[lang]}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt").to(self.device)
        with torch.random.fork_rng(devices=[self.device] if str(self.device).startswith("cuda") else []), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode([new_tokens], skip_special_tokens=True)[0].strip()


def dashscope_expand(image, prompt: str, lang: str, seed: int, model: str, api_key: str, url: str = DASHSCOPE_URL,
                     timeout: float = DASHSCOPE_TIMEOUT_S) -> str:
    """One call of DashScope's multimodal generation API (result_format message); raises with the reason."""
    import requests

    body = {"model": model,
            "input": {"messages": [
                {"role": "system", "content": [{"text": SYSTEM_PROMPTS[lang]}]},
                {"role": "user", "content": [{"image": "data:image/png;base64," + base64.b64encode(_png(image)).decode()},
                                             {"text": prompt}]}]},
            "parameters": {"seed": seed % 2**31, "max_tokens": MAX_NEW_TOKENS, "result_format": "message"}}
    try:
        reply = requests.post(url, json=body, timeout=timeout, allow_redirects=False,
                              headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    except requests.Timeout:
        raise RuntimeError(f"DashScope gave no answer within {timeout:g} s") from None
    except requests.RequestException as exc:
        raise RuntimeError(f"DashScope unreachable ({type(exc).__name__})") from None
    try:
        data = reply.json()
    except ValueError:
        raise RuntimeError(f"DashScope answered HTTP {reply.status_code} with a body that is not JSON") from None
    if reply.status_code != 200:
        # the status and the API's error code only: its message and body are the service's words (they may echo the
        # request or name the account) and go to the log
        code = data.get("code") if isinstance(data, dict) else None
        code = code if isinstance(code, str) and DASHSCOPE_CODE.fullmatch(code) else ""
        log.warning("DashScope answered HTTP %s: %.500s", reply.status_code, reply.text)
        raise RuntimeError(f"DashScope answered HTTP {reply.status_code}" + (f" ({code})" if code else ""))
    try:
        content = data["output"]["choices"][0]["message"]["content"]
        text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RuntimeError("DashScope's answer has no output.choices[0].message.content") from None
    if not text.strip():
        raise RuntimeError("DashScope answered with an empty description")
    return text.strip()


def clean_description(text: str) -> str:
    """A model's or a service's text as a prompt: control characters (NUL...) dropped, whitespace collapsed, at
    most WAN_MAX_PROMPT_CHARS characters (the text encoder reads 512 tokens anyway)."""
    from .request.settings import Limits

    text = " ".join("".join(c if unicodedata.category(c)[0] != "C" else " " for c in str(text)).split())
    limit = Limits.from_env().max_prompt_chars
    if len(text) > limit:
        text = text[:limit]
        text = text[: text.rindex(" ")] if " " in text else text  # at a word's end
    return text.strip()


def check_settings(method: str, model: str, roots: Iterable[Path], environ: Optional[Dict[str, str]] = None) -> Optional[Path]:
    """What can be checked before a run: the local model's folder (returned), DashScope's key."""
    environ = os.environ if environ is None else environ
    name = check_model_name(model_name(method, model))
    if method == "local_qwen":
        return find_local_model(name, roots)
    if not environ.get("DASH_API_KEY"):
        raise InvalidParameter("prompt_extend_method", "dashscope needs DASH_API_KEY set on the server")
    return None


def extend(image, prompt: str, seed: int, method: str = "local_qwen", model: str = "", lang: str = "zh",
           strict: bool = False, roots: Iterable[Path] = (), local: Optional[Callable[[Path], LocalQwenExpander]] = None,
           environ: Optional[Dict[str, str]] = None, device: str = "cpu") -> Extension:
    """Extend `prompt` for `image`. Bad settings (method, language, a model not on disk, no DashScope key) raise
    InvalidParameter; a failed extension falls back to `prompt`, or raises PromptExtendFailed when strict.
    `local(folder)` gives the loaded expander for a folder (the caller keeps it warm); `device`: where it may
    write (the GPU when it fits there beside what is loaded, else the CPU)."""
    method, lang = spec.check("prompt_extend_method", method), spec.check("prompt_extend_target_lang", lang)
    environ = os.environ if environ is None else environ
    name = model_name(method, model)
    folder = check_settings(method, model, roots, environ)
    seed = seed if seed >= 0 else random.SystemRandom().randint(0, 2**31 - 1)  # -1: a random one, as upstream
    if method == "local_qwen":
        run = lambda: (local or LocalQwenExpander)(folder).expand_on(device, image, prompt, lang, seed)
    else:
        key = environ["DASH_API_KEY"]
        url = environ.get("DASH_API_URL") or DASHSCOPE_URL
        try:
            timeout = float(environ.get("DASH_API_TIMEOUT_S") or DASHSCOPE_TIMEOUT_S)
        except ValueError:
            timeout = DASHSCOPE_TIMEOUT_S
        run = lambda: (dashscope_expand(image, prompt, lang, seed, name, key, url, timeout), "remote")
    where = ""
    try:
        text, where = run()
        extended = clean_description(text)
        if not extended:
            raise RuntimeError("the model wrote nothing usable")
    except InvalidParameter:
        raise
    except Exception as exc:  # noqa: BLE001 - upstream falls back to the original prompt
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]  # its first line, bounded
        if strict:
            raise PromptExtendFailed(f"prompt extension ({method}, {name}) failed: {why}") from exc
        return Extension(prompt, f"fallback: {why}", method, name, where)
    return Extension(extended, "extended", method, name, where)
