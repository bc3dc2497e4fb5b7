"""One code path from parameters to an MP4: used by the CLI, the RunPod worker and the Python API.

    from headless.run import run
    result = run({"image": "in.png", "prompt": "a cat", "frame_num": 33}, server="http://127.0.0.1:8188",
                 out="cat.mp4")
    print(result.output_path, result.seed, result.frames)
"""
from __future__ import annotations

import base64
import hashlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from .client import ComfyClient, Progress, output_files
from .errors import BadInput, OutputMissing, WaitTimeout, WorkflowError
from .params import MAX_SEED, ParamError, normalize_params
from .workflow import (ROLE_CORE_IMAGE, ROLE_I2V, ROLE_IMAGE, ROLE_SAVE, apply_overrides, apply_params,
                       find_nodes, load_workflow)

__all__ = ["run", "Result", "prepare_prompt", "prepare_image", "collect_result", "MAX_IMAGE_BYTES"]

MAX_IMAGE_BYTES = 50 * 1024 * 1024
IMAGE_FETCH_TIMEOUT = 60


@dataclass
class Result:
    output_path: Optional[str]
    prompt_id: str
    seed: Optional[int]
    seconds: float
    frames: Optional[int]
    width: Optional[int]
    height: Optional[int]
    filename: Optional[str] = None
    subfolder: str = ""
    cached: bool = False
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _fetch_url(url: str) -> bytes:
    import requests

    try:
        with requests.get(url, stream=True, timeout=IMAGE_FETCH_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise BadInput(f"image URL {url} answered HTTP {resp.status_code}")
            chunks, total = [], 0
            for chunk in resp.iter_content(1 << 16):
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise BadInput(f"image URL {url} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise BadInput(f"cannot download image URL {url}: {exc}") from None


def _image_bytes(params: Dict[str, Any]) -> Tuple[bytes, str]:
    """The image as bytes and a file extension."""
    if "image_base64" in params:
        try:
            data = base64.b64decode(params["image_base64"], validate=False)
        except (ValueError, TypeError) as exc:
            raise ParamError("image_base64", f"is not valid base64 ({exc})") from None
        return data, ".png"
    image = str(params["image"])
    if image.lower().startswith(("http://", "https://")):
        suffix = Path(image.split("?", 1)[0]).suffix.lower()
        return _fetch_url(image), suffix if suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp") else ".png"
    if image.lower().startswith("file://"):
        image = image[7:]
    path = Path(image).expanduser()
    if not path.is_file():
        raise ParamError("image", f"no such file: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ParamError("image", f"{path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return path.read_bytes(), path.suffix.lower() or ".png"


def prepare_image(client: Optional[ComfyClient], prompt: dict, params: Dict[str, Any],
                  object_info: Optional[dict] = None) -> Optional[str]:
    """Put the image into the workflow: upload it for core ``LoadImage`` nodes, or fill ``Wan22LoadImage``
    (URL as ``image_url``, anything else as ``image_base64``, so a remote server works). Returns what was set."""
    if "image" not in params and "image_base64" not in params:
        return None
    core = find_nodes(prompt, ROLE_CORE_IMAGE)
    core = [nid for nid in core if prompt[nid].get("class_type") == ROLE_CORE_IMAGE] or core
    ours = [nid for nid in find_nodes(prompt, ROLE_IMAGE) if prompt[nid].get("class_type") == ROLE_IMAGE]
    if core:
        if client is None:
            raise WorkflowError("uploading the image needs a server")
        data, suffix = _image_bytes(params)
        name = "wan22_" + hashlib.sha256(data).hexdigest()[:20] + suffix
        uploaded = client.upload_image(data, name)
        for nid in core:
            prompt[nid].setdefault("inputs", {})["image"] = uploaded
        return uploaded
    if ours:
        image = params.get("image")
        values = {"image_url": "", "image_base64": "", "image_path": ""}
        if image and str(image).lower().startswith(("http://", "https://")):
            values["image_url"] = image
        else:
            data, _ = _image_bytes(params)
            values["image_base64"] = base64.b64encode(data).decode("ascii")
        for nid in ours:
            for key, value in values.items():
                prompt[nid].setdefault("inputs", {})[key] = value
        return "image_url" if values["image_url"] else "image_base64"
    raise WorkflowError("the workflow has no image input node (LoadImage or Wan22LoadImage) for the image")


def _seed_max(object_info: Optional[dict], class_type: str) -> int:
    try:
        spec = object_info[class_type]["input"]
        opts = (spec.get("required") or {}).get("seed") or (spec.get("optional") or {}).get("seed")
        return min(int(opts[1].get("max", MAX_SEED)), MAX_SEED)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        return MAX_SEED


def resolve_random_seeds(prompt: dict, object_info: Optional[dict] = None, rng: Optional[random.Random] = None) -> Optional[int]:
    """Replace seed -1 on the sampler nodes by a concrete random seed (as upstream does), so the server never
    serves a cached result for a 'random' run and the caller knows the seed. Returns the seed set, if any."""
    rng = rng or random.SystemRandom()
    chosen = None
    for nid in find_nodes(prompt, ROLE_I2V):
        inputs = prompt[nid].setdefault("inputs", {})
        seed = inputs.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool) and seed < 0:
            chosen = rng.randint(0, _seed_max(object_info, prompt[nid].get("class_type", ROLE_I2V)))
            inputs["seed"] = chosen
        elif isinstance(seed, int) and chosen is None:
            chosen = seed
    return chosen


def prepare_prompt(params: Dict[str, Any], workflow: Union[str, Path, dict, None] = None,
                   client: Optional[ComfyClient] = None, overrides: Iterable = (), strict: bool = True,
                   object_info: Optional[dict] = None) -> Tuple[dict, Dict[str, Any], List[str]]:
    """Normalize the parameters and fill a copy of the workflow; returns (prompt, params, warnings).
    Does not upload (see :func:`prepare_image`)."""
    params, warnings = normalize_params(params or {}, strict=strict)
    if object_info is None and client is not None:
        object_info_fn = client.object_info
    else:
        object_info_fn = None
    prompt = load_workflow(workflow, object_info=object_info, object_info_fn=object_info_fn)
    if object_info is None and client is not None:
        object_info = client.object_info()
    apply_params(prompt, params, object_info)
    apply_overrides(prompt, overrides, object_info)
    return prompt, params, warnings


def collect_result(entry: dict, prompt: dict) -> Tuple[Optional[dict], Dict[str, Any]]:
    """(the video file entry, the sampler's ``wan22`` info) from a history entry."""
    files = output_files(entry)
    save_ids = set(find_nodes(prompt, ROLE_SAVE))
    video = None
    ranked = sorted(files, key=lambda f: (f["node"] not in save_ids, not f["animated"],
                                          not f["filename"].lower().endswith((".mp4", ".webm", ".mov", ".gif"))))
    if ranked:
        video = ranked[0]
    info: Dict[str, Any] = {}
    outputs = entry.get("outputs") or {}
    for nid in find_nodes(prompt, ROLE_I2V) + list(outputs):
        items = (outputs.get(nid) or {}).get("wan22")
        if isinstance(items, list) and items and isinstance(items[0], dict):
            info = items[0]
            break
    return video, info


def run(params: Dict[str, Any], server: Union[str, ComfyClient, None] = None,
        workflow: Union[str, Path, dict, None] = None, out: Union[str, Path, None] = None,
        on_progress: Optional[Callable[[Progress], None]] = None, timeout: Optional[float] = None,
        overrides: Iterable = (), strict: bool = True, download: bool = True,
        on_queued: Optional[Callable[[str], None]] = None) -> Result:
    """Run one image-to-video job on a ComfyUI server and download the MP4.

    params: the seed's parameter names (see headless.params). server: URL or a ComfyClient (default
    ``$COMFYUI_URL`` or http://127.0.0.1:8188). workflow: API/UI file or dict (default: the shipped API
    workflow). out: file or folder for the MP4 (default: the server's file name in the current folder).
    overrides: ``NODE_OR_TITLE.input=VALUE`` strings. Ctrl-C interrupts the server's job, then re-raises.
    Raises the errors of headless.errors (ParamError for bad parameters).
    """
    own_client = not isinstance(server, ComfyClient)
    client = server if isinstance(server, ComfyClient) else ComfyClient(server)
    started = time.monotonic()
    try:
        object_info = client.object_info()
        prompt, params, warnings = prepare_prompt(params, workflow, client, overrides, strict, object_info)
        client.check_node_types(prompt)
        prepare_image(client, prompt, params, object_info)
        seed = resolve_random_seeds(prompt, object_info)
        prompt_id = client.queue_prompt(prompt, check_types=False)
        if on_queued is not None:
            on_queued(prompt_id)
        try:
            remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
            entry = client.wait(prompt_id, on_progress=on_progress, timeout=remaining)
        except KeyboardInterrupt:
            _cancel_quietly(client, prompt_id)
            raise
        except WaitTimeout:
            _cancel_quietly(client, prompt_id, wait=0)
            raise
        video, info = collect_result(entry, prompt)
        if video is None:
            raise OutputMissing(f"prompt {prompt_id} finished but its outputs list no video "
                                f"(outputs: {list((entry.get('outputs') or {}).keys())})")
        path = None
        if download:
            dest = Path(out) if out else Path.cwd()
            if out and (str(out).endswith(("/", "\\")) or dest.is_dir()):
                dest.mkdir(parents=True, exist_ok=True)
            path = str(client.download(video["filename"], video["subfolder"], video["type"], dest))
        used_seed = info.get("seed", seed)
        cached = bool(client.last_cached_nodes) and set(find_nodes(prompt, ROLE_I2V)) <= set(client.last_cached_nodes)
        return Result(output_path=path, prompt_id=prompt_id, seed=used_seed,
                      seconds=round(time.monotonic() - started, 3), frames=info.get("frames"),
                      width=info.get("width"), height=info.get("height"), filename=video["filename"],
                      subfolder=video["subfolder"], cached=cached, warnings=warnings)
    finally:
        if own_client:
            client.close()


def _cancel_quietly(client: ComfyClient, prompt_id: str, wait: float = 10.0) -> None:
    """Ctrl-C or timeout: take our prompt off the server (interrupt if running, delete if queued)."""
    try:
        client.cancel(prompt_id)
    except Exception:
        return
    if wait > 0:
        client.wait_until_settled(prompt_id, wait)
