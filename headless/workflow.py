"""Load ComfyUI workflows (API or UI format), find nodes by role, fill in parameters (no torch).

Roles are class types or titles, never numeric ids: a user may rebuild the graph, and the code still finds
``Wan22ImageToVideo`` (or a node titled so).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

from wan22.request import spec

from .errors import WorkflowError

__all__ = ["load_workflow", "is_ui_workflow", "ui_to_api", "find_nodes", "find_node", "apply_params",
           "apply_overrides", "apply_loras", "parse_set", "default_workflow_path", "PARAM_TARGETS", "ROLE_LOADER",
           "ROLE_TEXT", "ROLE_I2V", "ROLE_SAVE", "ROLE_IMAGE", "ROLE_CORE_IMAGE"]

ROLE_LOADER, ROLE_TEXT, ROLE_I2V, ROLE_SAVE, ROLE_IMAGE = spec.LOADER, spec.TEXT, spec.I2V, spec.SAVE, spec.LOAD_IMAGE
ROLE_LORA = spec.LORA
ROLE_EXTEND = spec.EXTEND
ROLE_EXTEND_VIDEO = spec.EXTEND_VIDEO
ROLE_CORE_IMAGE = "LoadImage"

# parameter -> (node role, input name): every node input of the spec except the image sources, which
# headless.run.prepare_images puts in (an upload for a core LoadImage, or Wan22LoadImage's inputs)
PARAM_TARGETS: Dict[str, Tuple[str, str]] = {
    p.name: (p.node, p.name) for p in spec.PARAMS if p.node not in (None, ROLE_IMAGE, ROLE_LORA)}

SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")
API_WORKFLOW_NAME = "wan22_i2v_a14b.json"


def default_workflow_path() -> Path:
    """``$WAN22_WORKFLOW``, else the shipped API workflow: ``workflows/api/`` in a checkout, the package's
    ``workflows/`` when installed (pyproject maps that folder into the wheel)."""
    env = os.environ.get("WAN22_WORKFLOW")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "workflows" / "api" / API_WORKFLOW_NAME, here / "workflows" / API_WORKFLOW_NAME):
        if candidate.is_file():
            return candidate
    return here.parent / "workflows" / "api" / API_WORKFLOW_NAME


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_workflow(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def load_workflow(source: Union[str, os.PathLike, dict, None] = None, object_info: Optional[dict] = None,
                  object_info_fn=None) -> dict:
    """Return an API-format workflow (a deep copy). UI-format input is converted with ``object_info``
    (or ``object_info_fn()`` called only when needed)."""
    if source is None:
        source = default_workflow_path()
        if not Path(source).is_file():
            raise WorkflowError(f"the shipped workflow {source} is not here (an installed package without the "
                                f"repository?): pass --workflow FILE or set WAN22_WORKFLOW")
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        where = "workflow"
    else:
        path = Path(source)
        where = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkflowError(f"workflow file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise WorkflowError(f"cannot read workflow {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and is_api_workflow(data["prompt"]):
        data = data["prompt"]  # a saved /prompt body
    if is_api_workflow(data):
        return {str(k): v for k, v in data.items()}
    if is_ui_workflow(data):
        if object_info is None and object_info_fn is not None:
            object_info = object_info_fn()
        if object_info is None:
            raise WorkflowError(f"{where} is a UI-format workflow; converting it needs the server's /object_info")
        return ui_to_api(data, object_info)
    raise WorkflowError(f"{where} is neither an API-format workflow ({{id: {{class_type, inputs}}}}) nor a "
                        f"UI-format workflow ({{nodes, links}})")


# ----------------------------------------------------------------------- UI -> API
def _input_order(spec: dict) -> List[Tuple[str, Any]]:
    order = []
    for section in ("required", "optional"):
        for name, value in ((spec.get("input") or {}).get(section) or {}).items():
            order.append((name, value))
    if spec.get("input_order"):
        wanted = [n for sec in ("required", "optional") for n in (spec["input_order"].get(sec) or [])]
        lookup = dict(order)
        order = [(n, lookup[n]) for n in wanted if n in lookup] + [(n, v) for n, v in order if n not in wanted]
    return order


def _is_widget(value: Any) -> bool:
    if not isinstance(value, (list, tuple)) or not value:
        return False
    kind = value[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(name: str, value: Any) -> bool:
    opts = value[1] if isinstance(value, (list, tuple)) and len(value) > 1 and isinstance(value[1], dict) else {}
    if opts.get("control_after_generate"):
        return True
    return value[0] == "INT" and name in ("seed", "noise_seed")


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a graph-editor workflow to API format, as the frontend's graphToPrompt does:
    widget values mapped to inputs in declaration order (skipping the control_after_generate value that
    follows seed-like widgets), links turned into ``[node_id, slot]``, Reroute nodes followed, muted
    nodes dropped and bypassed nodes passed through."""
    nodes = {n["id"]: n for n in ui.get("nodes", []) if isinstance(n, dict) and "id" in n}
    links: Dict[Any, Tuple[Any, int]] = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link.get("id")] = (link.get("origin_id"), link.get("origin_slot"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = (link[1], link[2])
    unknown = sorted({n.get("type") for n in nodes.values()
                      if n.get("type") not in object_info and n.get("type") not in VIRTUAL_NODES
                      and n.get("mode", 0) not in (2, 4)})
    if unknown:
        raise WorkflowError("the UI workflow uses node types the server does not know: " + ", ".join(map(str, unknown))
                            + " (custom node pack missing or failed to import?)")

    def resolve(link_id, depth=0):
        """Follow a link back through Reroute and bypassed nodes to a real output."""
        if depth > 64 or link_id not in links:
            return None
        origin, slot = links[link_id]
        node = nodes.get(origin)
        if node is None:
            return None
        if node.get("type") == "Reroute" or node.get("mode") == 4:
            wanted_type = None
            outs = node.get("outputs") or []
            if slot is not None and slot < len(outs):
                wanted_type = outs[slot].get("type")
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (node.get("type") == "Reroute" or inp.get("type") == wanted_type):
                    return resolve(inp["link"], depth + 1)
            return None
        if node.get("mode") == 2:
            return None
        return [str(origin), slot]

    api: Dict[str, dict] = {}
    for node_id, node in sorted(nodes.items(), key=lambda kv: str(kv[0])):
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode") in (2, 4):
            continue
        spec = object_info[kind]
        linked = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                target = resolve(inp["link"])
                if target is not None:
                    linked[inp["name"]] = target
        values = node.get("widgets_values")
        inputs: Dict[str, Any] = {}
        if isinstance(values, dict):
            for name, value in _input_order(spec):
                if name in values and _is_widget(value):
                    inputs[name] = values[name]
        else:
            values = list(values or [])
            pos = 0
            for name, value in _input_order(spec):
                if not _is_widget(value):
                    continue
                if pos >= len(values):
                    break
                inputs[name] = values[pos]
                pos += 1
                if _has_control(name, value) and pos < len(values) and values[pos] in SEED_CONTROL_VALUES:
                    pos += 1
        inputs.update(linked)
        entry = {"class_type": kind, "inputs": inputs}
        title = node.get("title") or spec.get("display_name") or kind
        entry["_meta"] = {"title": title}
        api[str(node_id)] = entry
    if not api:
        raise WorkflowError("the UI workflow has no executable nodes")
    return api


# ---------------------------------------------------------------------- roles
def _title(node: dict) -> str:
    return str((node.get("_meta") or {}).get("title") or "")


def find_nodes(workflow: dict, role: str) -> List[str]:
    """Node ids whose class_type or ``_meta.title`` equals ``role`` (case-insensitive), or the id itself.
    Exact class_type matches come first."""
    role_l = role.strip().lower()
    by_class = [nid for nid, n in workflow.items() if str(n.get("class_type", "")).lower() == role_l]
    by_title = [nid for nid, n in workflow.items() if _title(n).lower() == role_l and nid not in by_class]
    by_id = [nid for nid in workflow if nid == role.strip() and nid not in by_class and nid not in by_title]
    return by_class + by_title + by_id


def find_node(workflow: dict, role: str, required: bool = True) -> Optional[str]:
    ids = find_nodes(workflow, role)
    if not ids:
        if required:
            raise WorkflowError(f"the workflow has no node '{role}' (nodes: {describe_nodes(workflow)})")
        return None
    return ids[0]


def describe_nodes(workflow: dict) -> str:
    parts = []
    for nid, n in workflow.items():
        title = _title(n)
        kind = n.get("class_type")
        parts.append(f"{nid}:{kind}" + (f" '{title}'" if title and title != kind else ""))
    return ", ".join(parts)


def _known_inputs(workflow: dict, node_id: str, object_info: Optional[dict]) -> List[str]:
    names = list((workflow[node_id].get("inputs") or {}).keys())
    spec = (object_info or {}).get(workflow[node_id].get("class_type"))
    if spec:
        for name, _ in _input_order(spec):
            if name not in names:
                names.append(name)
    return names


def set_input(workflow: dict, role: str, name: str, value: Any, object_info: Optional[dict] = None,
              all_matches: bool = True, skip: Iterable[str] = ()) -> List[str]:
    """Set ``name`` on every node matching ``role`` (but those in `skip`); raises WorkflowError naming valid
    inputs if unknown. An explicit value replaces a link."""
    ids = find_nodes(workflow, role)
    if not ids:
        raise WorkflowError(f"no node '{role}' in the workflow (nodes: {describe_nodes(workflow)})")
    if not all_matches:
        ids = ids[:1]
    for nid in [n for n in ids if n not in set(skip)]:
        known = _known_inputs(workflow, nid, object_info)
        if name not in known:
            raise WorkflowError(f"node {nid} ({workflow[nid].get('class_type')}) has no input '{name}' "
                                f"(inputs: {', '.join(known) or 'none'})")
        workflow[nid].setdefault("inputs", {})[name] = value
    return ids


def _next_id(workflow: dict) -> int:
    """The first free numeric node id (after the highest one) for nodes this module adds."""
    return max((int(n) for n in workflow if str(n).isdigit()), default=0) + 1


def _fed_by(workflow: dict, nid: str, name: str, sources: Iterable[str]) -> bool:
    value = (workflow[nid].get("inputs") or {}).get(name)
    return isinstance(value, list) and len(value) == 2 and str(value[0]) in set(sources)


def upstream_of(workflow: dict, nid: str, name: str) -> Set[str]:
    """The ids of the nodes input `name` of node `nid` reads from, directly or through other nodes."""
    seen: Set[str] = set()
    todo = [(workflow.get(nid, {}).get("inputs") or {}).get(name)]
    while todo:
        value = todo.pop()
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in workflow and str(value[0]) not in seen:
            seen.add(str(value[0]))
            todo += list((workflow[str(value[0])].get("inputs") or {}).values())
    return seen


def image_loaders(workflow: dict) -> Dict[str, List[str]]:
    """The image-loading nodes (LoadImage, Wan22LoadImage) by the role they feed (spec.IMAGE_ROLES): `last_image`
    those that feed a node's last_image input (the sampler's, an extend node's) and none of its other inputs;
    `image` every other."""
    loaders = [nid for nid, node in workflow.items() if node.get("class_type") in (ROLE_CORE_IMAGE, ROLE_IMAGE)]
    ends: Set[str] = set()
    for nid, node in workflow.items():
        inputs = node.get("inputs") or {}
        if isinstance(inputs.get("last_image"), list):
            others = set().union(*(upstream_of(workflow, nid, name) for name in inputs if name != "last_image"))
            ends |= upstream_of(workflow, nid, "last_image") - others
    return {"image": [n for n in loaders if n not in ends], "last_image": [n for n in loaders if n in ends]}


def final_clips(workflow: dict) -> List[str]:
    """The sampling nodes (the sampler, extend nodes) that make a video's last clip: none extends their frames."""
    sampling = find_nodes(workflow, ROLE_I2V) + find_nodes(workflow, ROLE_EXTEND_VIDEO)
    extended = set().union(*(upstream_of(workflow, nid, "frames") for nid in sampling))
    return [nid for nid in sampling if nid not in extended]


def add_last_image_loader(workflow: dict, class_type: str) -> str:
    """A new `class_type` loader linked to the last_image input of the nodes that make the last clip (final_clips),
    in place; returns its id. Raises WorkflowError when such an input is already connected (to a node that is not
    an end-image loader of its own: image_loaders found none)."""
    finals = final_clips(workflow)
    taken = [nid for nid in finals if (workflow[nid].get("inputs") or {}).get("last_image") is not None]
    if taken:
        raise WorkflowError(f"the last_image input of node {taken[0]} is connected to a node that is not a loader of "
                            f"its own (the reference image's, or another node); give the end image its own LoadImage "
                            f"node, or leave last_image unconnected")
    nid = str(_next_id(workflow))
    workflow[nid] = {"class_type": class_type, "_meta": {"title": "End image (last_image)"}, "inputs": {}}
    for final in finals:
        workflow[final].setdefault("inputs", {})["last_image"] = [nid, 0]
    return nid


def apply_params(workflow: dict, params: Dict[str, Any], object_info: Optional[dict] = None) -> dict:
    """Fill canonical parameters (wan22.request.spec names) into the nodes that take them, in place; returns it.

    A parameter that `also` goes to other nodes (the seed, and the prompt of a prompt-extension node) is set
    there too; an input fed by such a node (the text encoder's prompt, from the extension) keeps its link.
    The image sources are not handled here (they need an upload or the Wan22LoadImage node; see
    :func:`headless.run.prepare_images`). Raises WorkflowError when a parameter's node is missing.
    """
    for key, value in params.items():
        if key in spec.IMAGE_FIELDS:
            continue
        target = PARAM_TARGETS.get(key)
        if target is None:
            raise WorkflowError(f"no workflow input for parameter '{key}' (known: {', '.join(sorted(PARAM_TARGETS))})")
        role, name = target
        if not find_nodes(workflow, role):
            raise WorkflowError(f"parameter '{key}' goes to a {role} node, and the workflow has none "
                                f"(nodes: {describe_nodes(workflow)})")
        others = [nid for other in spec.SPEC[key].also for nid in find_nodes(workflow, other)]
        fed = [nid for nid in find_nodes(workflow, role) if _fed_by(workflow, nid, name, others)]
        set_input(workflow, role, name, value, object_info, skip=fed)
        for other in {workflow[nid]["class_type"] for nid in others}:
            set_input(workflow, other, name, value, object_info)
    return workflow


def apply_prompt_extend(workflow: dict, on: bool) -> dict:
    """use_prompt_extend, in place: on, a Wan22PromptExtend node (the sampler's image, the text encoder's prompt)
    feeds each text encoder's prompt; off, such nodes are taken out and the text encoders get their prompt back."""
    extenders = [nid for nid, node in workflow.items() if node.get("class_type") == ROLE_EXTEND]
    texts = find_nodes(workflow, ROLE_TEXT)
    if not on:
        for nid in extenders:
            for text in texts:
                if _fed_by(workflow, text, "prompt", [nid]):
                    workflow[text]["inputs"]["prompt"] = (workflow[nid].get("inputs") or {}).get("prompt", "")
            del workflow[nid]
        return workflow
    if extenders:
        return workflow
    sampler = find_node(workflow, ROLE_I2V)
    sampler_inputs = workflow[sampler].get("inputs") or {}
    first = _next_id(workflow)
    for offset, text in enumerate(texts):
        nid = str(first + offset)
        inputs = {"image": sampler_inputs.get("image"), "prompt": workflow[text]["inputs"].get("prompt", ""),
                  **{p.name: p.default for p in spec.node_params(ROLE_EXTEND) if p.name not in ("prompt", "image")},
                  "seed": sampler_inputs.get("seed", spec.default("seed"))}
        workflow[nid] = {"class_type": ROLE_EXTEND, "_meta": {"title": "Wan2.2 Prompt Extend"}, "inputs": inputs}
        workflow[text]["inputs"]["prompt"] = [nid, 0]
    return workflow


def apply_loras(workflow: dict, loras: List[Dict[str, Any]]) -> dict:
    """Make `loras` ({name, expert, strength}, checked) the workflow's LoRAs, in place: its own LoRA nodes are
    taken out, and a chain of one Wan22LoraLoader per entry goes between the model loader and every node that
    took the loader's model."""
    def relink(old: list, new: list) -> None:
        for node in workflow.values():
            for name, value in (node.get("inputs") or {}).items():
                if value == old:
                    node["inputs"][name] = list(new)

    loader = find_node(workflow, ROLE_LOADER)
    for nid in [n for n, node in workflow.items() if node.get("class_type") == ROLE_LORA]:
        source = (workflow[nid].get("inputs") or {}).get("model")
        del workflow[nid]
        relink([nid, 0], source if isinstance(source, list) else [loader, 0])
    if not loras:
        return workflow
    next_id = _next_id(workflow)
    previous = [loader, 0]
    chain = []
    for index, entry in enumerate(loras):
        nid = str(next_id + index)
        high = entry["strength"] if entry["expert"] in ("high", "both") else 0.0
        low = entry["strength"] if entry["expert"] in ("low", "both") else 0.0
        chain.append((nid, {"class_type": ROLE_LORA, "_meta": {"title": f"LoRA {index + 1} ({entry['expert']})"},
                            "inputs": {"model": previous, "lora_name": entry["name"], "strength_high": high, "strength_low": low}}))
        previous = [nid, 0]
    relink([loader, 0], previous)
    workflow.update(chain)  # after relinking, so the first LoRA node keeps the loader as its input
    return workflow


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _convert(text: str, spec_type: Any, where: str) -> Any:
    """Turn a --set value into the input's declared type (STRING/COMBO keep the text as written)."""
    if spec_type == "STRING" or isinstance(spec_type, list):
        return text
    if spec_type == "INT":
        try:
            return int(text)
        except ValueError:
            raise WorkflowError(f"--set {where}: {text!r} is not an integer") from None
    if spec_type == "FLOAT":
        try:
            return float(text)
        except ValueError:
            raise WorkflowError(f"--set {where}: {text!r} is not a number") from None
    if spec_type == "BOOLEAN":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise WorkflowError(f"--set {where}: {text!r} is not true/false")
    return _parse_value(text)


def parse_set(expr: str) -> Tuple[str, str, str]:
    """``'NODE_OR_TITLE.input=VALUE'`` -> (role, input, raw value text)."""
    if "=" not in expr:
        raise WorkflowError(f"--set {expr!r}: expected NODE_OR_TITLE.input=VALUE")
    target, value = expr.split("=", 1)
    if "." not in target:
        raise WorkflowError(f"--set {expr!r}: expected NODE_OR_TITLE.input=VALUE (no '.' before '=')")
    role, name = target.rsplit(".", 1)
    if not role.strip() or not name.strip():
        raise WorkflowError(f"--set {expr!r}: empty node or input name")
    return role.strip(), name.strip(), value


def apply_overrides(workflow: dict, overrides: Iterable[Union[str, Tuple[str, str, Any]]],
                    object_info: Optional[dict] = None) -> dict:
    """Apply ``--set`` overrides in order. A string value is converted to the input's declared type
    (from ``object_info``; without it, JSON if it parses, else text)."""
    for item in overrides or ():
        role, name, value = parse_set(item) if isinstance(item, str) else item
        if isinstance(value, str):
            spec_type = None
            ids = find_nodes(workflow, role)
            if ids and object_info:
                spec = object_info.get(workflow[ids[0]].get("class_type")) or {}
                for n, v in _input_order(spec):
                    if n == name and isinstance(v, (list, tuple)) and v:
                        spec_type = v[0]
            if spec_type is None and ids:
                current = (workflow[ids[0]].get("inputs") or {}).get(name)
                spec_type = {str: "STRING", bool: "BOOLEAN", int: "INT", float: "FLOAT"}.get(type(current))
            value = _convert(value, spec_type, f"{role}.{name}")
        set_input(workflow, role, name, value, object_info)
    return workflow
