"""One code path from parameters to an MP4: the CLI, the RunPod worker's request mode and the Python API.

    from headless.run import Hooks, run
    result = run({"image": "in.png", "prompt": "a cat", "frame_num": 33}, server="http://127.0.0.1:8188",
                 out="cat.mp4", hooks=Hooks(on_progress=print))
    print(result.output_path, result.seed, result.frames)

:func:`run` checks the parameters (wan22.request.spec), then :func:`run_checked` fills the workflow, puts the images in,
:func:`execute`\\ s the prompt (queue, wait with a deadline and a cancel event, progress) and downloads the MP4.
:class:`Hooks` carry what a caller adds around that, and are the one way to give each of these its callbacks:
the CLI's progress bar, the worker's records, RunPod progress, per-job upload names and clean-up of the files
a job leaves in ComfyUI's folders. The job's time limit is the `timeout` argument and the deadline of the
ComfyClient passed in (ComfyClient.bounded); the run never changes the client it is given.
"""
from __future__ import annotations

import base64
import hashlib
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from wan22.request import spec
from wan22.request.errors import InvalidParameter
from wan22.request.intake import CheckedImage, read_image

from .client import ComfyClient, Progress, output_files
from .errors import Cancelled, ExecutionFailed, ExecutionInterrupted, OutputMissing, WaitTimeout, WorkflowError
from .workflow import (PARAM_TARGETS, ROLE_CORE_IMAGE, ROLE_EXTEND, ROLE_I2V, ROLE_LORA, ROLE_SAVE,
                       add_last_image_loader, apply_loras, apply_overrides, apply_params, apply_prompt_extend,
                       final_clips, find_nodes, image_loaders, load_workflow)

__all__ = ["run", "run_checked", "execute", "Hooks", "Execution", "Result", "prepare_images", "collect_result",
           "resolve_random_seeds", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi")


def content_name(png: bytes) -> str:
    """The default upload name: the same image is uploaded once (ComfyUI's LoadImage caches by content)."""
    return "wan22_" + hashlib.sha256(png).hexdigest()[:20] + ".png"


@dataclass
class Hooks:
    """What a caller adds around one run; every field is optional.

    on_server_file(folder, subfolder, filename): a file this run put in the server's ``input`` or ``output``
    folder (the worker removes them after the job). cancel: set it to stop the run (the prompt is removed or
    interrupted, then Cancelled is raised). settle_s: after a cancel or timeout, how long to wait for the server
    to let go of the prompt, so the next one starts on an empty queue.
    """

    on_queued: Optional[Callable[[str], None]] = None
    on_running: Optional[Callable[[], None]] = None
    on_progress: Optional[Callable[[Progress], None]] = None
    on_node: Optional[Callable[[str, str], None]] = None  # (node id, its title or class type) as it starts
    on_server_file: Optional[Callable[[str, str, str], None]] = None
    upload_name: Callable[[bytes], str] = content_name
    cancel: Optional[threading.Event] = None
    settle_s: float = 10.0


@dataclass
class Execution:
    prompt_id: str
    entry: dict  # the /history entry
    timings: Dict[str, float]  # queue_s, generate_s
    cached_nodes: List[str]


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
    timings: Dict[str, float] = field(default_factory=dict)
    cached_nodes: List[str] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)  # what the sampler node reported (its `wan22` ui entry)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ============================================================================================ images
def prepare_images(client: ComfyClient, prompt: dict, values: Mapping[str, Any],
                   images: Optional[Mapping[str, CheckedImage]] = None, hooks: Optional[Hooks] = None,
                   label: Callable[[str], str] = str) -> None:
    """Put the reference image, and the end image when there is one, into the workflow's loaders
    (headless.workflow.image_loaders: the end image's are those feeding the sampler's last_image); a loader is
    added for an end image the workflow has none for.

    `images` ({role: image}, spec.IMAGE_ROLES) are images already read and checked (the worker's): then nothing
    is read from `values`. Otherwise the sources in `values` are read here as the CLI's user's own (any local
    path, private URLs allowed)."""
    hooks = hooks or Hooks()
    loaders = image_loaders(prompt)
    for role in spec.IMAGE_ROLES:
        source = spec.image_source(values, role) if images is None else None
        image = (images or {}).get(role)
        if image is None and source is None:
            continue
        if not loaders[role]:
            if role == "image":
                raise WorkflowError("the workflow has no image input node (LoadImage or Wan22LoadImage) for the image")
            like = prompt[loaders["image"][0]]["class_type"] if loaders["image"] else ROLE_CORE_IMAGE
            loaders[role] = [add_last_image_loader(prompt, like)]
        uploads = any(prompt[n]["class_type"] == ROLE_CORE_IMAGE for n in loaders[role])
        if image is None and (uploads or source[0] != "url"):  # a URL stays a URL for the server to fetch
            image = read_image(source[0], source[1], label(f"{role}_{source[0]}"), trusted=True)
        _fill_loaders(client, prompt, loaders[role], image, source, hooks)


def _fill_loaders(client: ComfyClient, prompt: dict, nodes: List[str], image: Optional[CheckedImage],
                  source: Optional[Tuple[str, str]], hooks: Hooks) -> None:
    """A core LoadImage gets the PNG uploaded; a Wan22LoadImage the URL (for the server to fetch) when there is
    no image read here, else the PNG as base64."""
    uploaded = None
    for nid in nodes:
        inputs = prompt[nid].setdefault("inputs", {})
        if prompt[nid]["class_type"] == ROLE_CORE_IMAGE:
            if uploaded is None:
                uploaded = client.upload_image(image.png, hooks.upload_name(image.png))
                if hooks.on_server_file:
                    hooks.on_server_file("input", "", uploaded)
            inputs["image"] = uploaded
        elif image is None:
            inputs.update(image_url=source[1], image_base64="", image_path="")
        else:
            inputs.update(image_url="", image_base64=base64.b64encode(image.png).decode("ascii"), image_path="")


# ============================================================================================ LoRAs
def server_lora_names(loras: List[Dict[str, Any]], object_info: dict, label: Callable[[str], str] = str) -> List[Dict[str, Any]]:
    """`loras` with each name as the server's Wan22LoraLoader lists it. A name the server does not list may be
    a local path to one of its files (a CLI on the server's machine): its file name is looked up in the list."""
    try:
        names = list(object_info[ROLE_LORA]["input"]["required"]["lora_name"][0])
    except (KeyError, TypeError, IndexError):
        raise WorkflowError("the server's Wan2.2 node pack has no Wan22LoraLoader node (an older version?): update "
                            "the pack on the server to use LoRAs") from None
    listed, problems = [], []
    for index, entry in enumerate(loras):
        name = entry["name"]
        if name not in names:
            local = Path(name).expanduser()
            same_file = [n for n in names if Path(n).name == local.name] if local.is_file() else []
            if len(same_file) != 1:
                shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"
                problems.append((label(f"loras[{index}].name"),
                                 f"{name!r} is not one of the server's LoRA files ({shown}); put the file into a LoRA folder "
                                 f"of the server (WAN_LORA_DIRS, else <model root>/loras and ComfyUI's models/loras)"))
                continue
            name = same_file[0]
        listed.append({**entry, "name": name})
    if problems:
        raise InvalidParameter.from_problems(problems)
    return listed


# ============================================================================================ seeds
def _seed_max(object_info: Optional[dict], class_type: str) -> int:
    try:
        inputs = object_info[class_type]["input"]
        opts = (inputs.get("required") or {}).get("seed") or (inputs.get("optional") or {}).get("seed")
        return min(int(opts[1].get("max", spec.MAX_SEED)), spec.MAX_SEED)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        return spec.MAX_SEED


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
    for nid in find_nodes(prompt, ROLE_EXTEND):  # the extension is seeded with the request's seed, as upstream
        inputs = prompt[nid].setdefault("inputs", {})
        if isinstance(inputs.get("seed"), int) and inputs["seed"] < 0 and chosen is not None:
            inputs["seed"] = chosen
    return chosen


# ============================================================================================ queue and wait
def execute(client: ComfyClient, prompt: dict, *, timeout: Optional[float] = None, hooks: Optional[Hooks] = None,
            check_types: bool = True) -> Execution:
    """Queue `prompt` and wait for it. On timeout, cancel or Ctrl-C the prompt is taken off the server
    (deleted if pending, interrupted if running) before the error is raised."""
    hooks = hooks or Hooks()
    if hooks.cancel is not None and hooks.cancel.is_set():
        raise Cancelled("cancelled before the prompt was queued")
    queued_at = time.monotonic()
    prompt_id = client.queue_prompt(prompt, check_types=check_types)
    started: Dict[str, float] = {}

    def on_event(kind: str, data: dict) -> None:
        if kind == "execution_start" and not started:
            started["at"] = time.monotonic()
            if hooks.on_running is not None:
                hooks.on_running()
        elif kind == "executing" and hooks.on_node is not None and data.get("node") in prompt:
            node = prompt[data["node"]]
            hooks.on_node(data["node"], (node.get("_meta") or {}).get("title") or node.get("class_type", "?"))

    try:
        if hooks.on_queued is not None:
            hooks.on_queued(prompt_id)
        entry = client.wait(prompt_id, on_progress=hooks.on_progress, timeout=timeout, on_event=on_event,
                            should_stop=hooks.cancel.is_set if hooks.cancel is not None else None)
    except (ExecutionFailed, ExecutionInterrupted):
        raise  # the server is done with the prompt
    except BaseException:  # timeout, cancel, Ctrl-C, a failing hook: the prompt must not run on
        _cancel_quietly(client, prompt_id, hooks.settle_s)
        raise
    running_from = started.get("at", queued_at)
    timings = {"queue_s": round(running_from - queued_at, 3), "generate_s": round(time.monotonic() - running_from, 3)}
    return Execution(prompt_id, entry, timings, list(client.last_cached_nodes))


def _cancel_quietly(client: ComfyClient, prompt_id: str, settle_s: float) -> None:
    late = client.grace(settle_s + 3.0)  # past a deadline too, but bounded: the server may be hung
    try:
        late.cancel(prompt_id)
    except Exception:
        return
    if settle_s > 0:
        late.wait_until_settled(prompt_id, settle_s)


def collect_result(entry: dict, prompt: dict) -> Tuple[Optional[dict], Dict[str, Any]]:
    """(the output file to download: the save node's video first, else any other output; the ``wan22`` info of
    the node that made the last clip: the sampler, or the last extend node) from a history entry."""
    save_ids = set(find_nodes(prompt, ROLE_SAVE))
    ranked = sorted(output_files(entry), key=lambda f: (f["node"] not in save_ids, not f["animated"],
                                           not f["filename"].lower().endswith(VIDEO_EXTENSIONS)))
    info: Dict[str, Any] = {}
    outputs = entry.get("outputs") or {}
    for nid in final_clips(prompt) + list(outputs):
        items = (outputs.get(nid) or {}).get("wan22")
        if isinstance(items, list) and items and isinstance(items[0], dict):
            info = dict(items[0])
            break
    for nid in find_nodes(prompt, ROLE_EXTEND):  # the prompt used and how the extension went
        items = (outputs.get(nid) or {}).get("wan22_prompt_extend")
        if isinstance(items, list) and items and isinstance(items[0], dict):
            info["prompt_extend"] = items[0]
    return (ranked[0] if ranked else None), info


# ============================================================================================ the whole run
def run(params: Dict[str, Any], server: Union[str, ComfyClient, None] = None,
        workflow: Union[str, Path, dict, None] = None, out: Union[str, Path, None] = None, *,
        timeout: Optional[float] = None, overrides: Iterable = (), download: bool = True,
        hooks: Optional[Hooks] = None) -> Result:
    """Run one image-to-video job on a ComfyUI server and download the MP4.

    params: the seed's parameter names and aliases (wan22.request.spec; docs/parameters.md). server: URL or a
    ComfyClient (default ``$COMFYUI_URL`` or http://127.0.0.1:8188). workflow: API/UI file or dict (default:
    the shipped API workflow). out: file or folder for the MP4 (default: the server's file name in the current
    folder). overrides: ``NODE_OR_TITLE.input=VALUE`` strings. timeout: seconds for the whole job (a client
    with an earlier deadline of its own keeps it). hooks: the callbacks (progress, queued, node...), as for every
    step of the run path. Ctrl-C interrupts the server's job, then re-raises. Raises InvalidParameter for bad
    parameters and the errors of headless.errors.
    """
    request = spec.normalize(params or {}, "cli")
    result = run_checked(request.values, server, workflow, out, timeout=timeout, overrides=overrides,
                         download=download, hooks=hooks, label=request.label)
    result.warnings[:0] = request.warnings
    return result


def run_checked(values: Mapping[str, Any], server: Union[str, ComfyClient, None] = None,
                workflow: Union[str, Path, dict, None] = None, out: Union[str, Path, None] = None, *,
                timeout: Optional[float] = None, overrides: Iterable = (), download: bool = True,
                images: Optional[Mapping[str, CheckedImage]] = None, hooks: Optional[Hooks] = None,
                label: Callable[[str], str] = str) -> Result:
    """:func:`run` for parameters already checked (canonical names); `images` the images already read, by role
    (prepare_images)."""
    hooks = hooks or Hooks()
    own_client = not isinstance(server, ComfyClient)
    given = server if isinstance(server, ComfyClient) else ComfyClient(server)
    started = time.monotonic()
    # every call, the upload and the download included, ends by then
    client = given.bounded(None if timeout is None else started + timeout)
    try:
        object_info = client.object_info()
        prompt = load_workflow(workflow, object_info=object_info)
        if values.get("use_prompt_extend") is not None:
            apply_prompt_extend(prompt, values["use_prompt_extend"])
        extending = bool(find_nodes(prompt, ROLE_EXTEND))
        apply_params(prompt, {k: v for k, v in values.items() if k in PARAM_TARGETS
                              and (extending or k not in spec.EXTENSION_OPTIONS)}, object_info)
        if values.get("loras") is not None:
            apply_loras(prompt, server_lora_names(values["loras"], object_info, label))
        apply_overrides(prompt, overrides, object_info)
        client.check_node_types(prompt)
        prepare_images(client, prompt, values, images, hooks, label)
        seed = resolve_random_seeds(prompt, object_info)
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - started))
        try:
            execution = execute(client, prompt, timeout=remaining, hooks=hooks, check_types=False)
        except WaitTimeout as exc:
            if timeout is None or exc.prompt_id is None:
                raise
            # the wait had what was left of the job's time; the message says the limit the caller gave
            raise WaitTimeout(f"prompt {exc.prompt_id} did not finish within {timeout:g}s",
                              prompt_id=exc.prompt_id) from None
        video, info = collect_result(execution.entry, prompt)
        if video is None:
            raise OutputMissing(f"prompt {execution.prompt_id} finished but its outputs list no video "
                                f"(outputs: {list((execution.entry.get('outputs') or {}).keys())})")
        if hooks.on_server_file and video["type"] == "output":  # before the download, which may fail
            hooks.on_server_file("output", video["subfolder"], video["filename"])
        timings = dict(execution.timings)
        path = None
        if download:
            t0 = time.monotonic()
            dest = Path(out) if out else Path.cwd()
            if out and (str(out).endswith(("/", "\\")) or dest.is_dir()):
                dest.mkdir(parents=True, exist_ok=True)
            path = str(client.download(video["filename"], video["subfolder"], video["type"], dest))
            timings["download_s"] = round(time.monotonic() - t0, 3)
        cached = set(find_nodes(prompt, ROLE_I2V)) <= set(execution.cached_nodes) if execution.cached_nodes else False
        cached_types = sorted({str(prompt.get(n, {}).get("class_type", n)) for n in execution.cached_nodes})
        return Result(output_path=path, prompt_id=execution.prompt_id, seed=info.get("seed", seed),
                      seconds=round(time.monotonic() - started, 3), frames=info.get("frames"),
                      width=info.get("width"), height=info.get("height"), filename=video["filename"],
                      subfolder=video["subfolder"], cached=cached, timings=timings, cached_nodes=cached_types,
                      info=info)
    finally:
        if own_client:
            given.close()
