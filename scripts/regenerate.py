"""Write every generated file from wan22.request.spec and the settings declarations, so none can drift from them:
the shipped workflows (API and UI format), their template-browser cards (web/wan22_templates.json),
docs/parameters.md and the generated blocks of the docs.

    .venv/bin/python -m scripts.regenerate            # rewrite what is stale
    .venv/bin/python -m scripts.regenerate --check    # exit 1 naming what is stale (a test runs this)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

from wan22.request import spec
from wan22.request.settings import LIMIT_SETTINGS, MEMORY_SETTINGS, Setting

REPO = Path(__file__).resolve().parents[1]

# the shipped graphs: id, class_type, title, links {input: (from_id, slot, type)}, outputs [(name, type)], position
# (laid out by lay_out), widget values. Widget values are the spec defaults of each node's parameters (the core
# LoadImage has its own), and for a preset's workflow the preset's values; its LoRAs become a chain of
# Wan22LoraLoader nodes (ids 6, 7, ...).
CORE_IMAGE_WIDGETS = [("image", "example.png"), ("upload", "image")]
LINK_ORDER = {"model": 0, "text": 1, "image": 2, "images": 0, "prompt": 3}
EXTEND = "extend"  # the variant with a prompt-extension node before the text encoder
LONG = "long"  # the chained long video: LONG_VIDEO's values on the sampler and the text encoder
WORKFLOWS = {"none": "wan22_i2v_a14b.json", "4step": "wan22_i2v_a14b_4step_lora.json",
             "4step_motion": "wan22_i2v_a14b_4step_motion.json",
             EXTEND: "wan22_i2v_a14b_prompt_extend.json", LONG: "wan22_i2v_a14b_long_video.json"}
LONG_VIDEO = {
    spec.I2V: {"segments": 3},
    spec.TEXT: {"segment_prompts": "\n".join((
        "A white cat in sunglasses sits on a surfboard and looks at the camera.",
        "A wave lifts the surfboard; the cat stands up and keeps its balance.",
        "The cat rides the wave towards the beach as the sun sets."))},
}


def _nodes(preset: str) -> list:
    """The graph of a preset, positions not yet laid out (None)."""
    if preset == EXTEND:
        nodes = _nodes("none")
        text = next(n for n in nodes if n[1] == spec.TEXT)
        nodes[nodes.index(text)] = (*text[:3], {**text[3], "prompt": (8, 0, "STRING")}, *text[4:])
        extender = (8, spec.EXTEND, "Wan2.2 Prompt Extend", {"image": (2, 0, "IMAGE")}, [("prompt", "STRING")], None, {})
        return nodes[:3] + [extender] + nodes[3:]
    if preset == LONG:
        return [(*n[:6], {**n[6], **LONG_VIDEO.get(n[1], {})}) for n in _nodes("none")]
    values = spec.PRESETS[preset]
    loras = values.get("loras", [])
    model = (6 + len(loras) - 1, 0, "WAN22_MODEL") if loras else (1, 0, "WAN22_MODEL")  # the last LoRA node
    nodes = [(1, spec.LOADER, "Wan2.2 Model Loader", {}, [("model", "WAN22_MODEL")], None, {})]
    for index, lora in enumerate(loras):
        source = (1, 0, "WAN22_MODEL") if index == 0 else (6 + index - 1, 0, "WAN22_MODEL")
        widget_values = {"lora_name": lora["name"], "strength_high": 1.0 if lora["expert"] != "low" else 0.0,
                         "strength_low": 1.0 if lora["expert"] != "high" else 0.0}
        nodes.append((6 + index, spec.LORA, f"LoRA ({lora['expert']} noise)", {"model": source},
                      [("model", "WAN22_MODEL")], None, widget_values))
    nodes += [
        (2, "LoadImage", "Reference Image", {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")], None, {}),
        (3, spec.TEXT, "Wan2.2 Text Encode", {"model": model}, [("text", "WAN22_TEXT")], None, {}),
        (4, spec.I2V, "Wan2.2 Image to Video",
         {"model": model, "text": (3, 0, "WAN22_TEXT"), "image": (2, 0, "IMAGE")},
         [("frames", "IMAGE"), ("seed", "INT")], None, values),
        (5, spec.SAVE, "Wan2.2 Save Video", {"images": (4, 0, "IMAGE")}, [("path", "STRING")], None, {}),
    ]
    return nodes


def graph(preset: str = "none") -> list:
    return lay_out(_nodes(preset))


# ---------------------------------------------------------------------------------------------- layout
# What both graph editors render (the 2024 LiteGraph and the 1.27 frontend agree, measured in Chromium by
# tests/test_graph_editor_layout.py): a node's body is SLOT_ROW px per row of slots (max(inputs, outputs, 1)),
# +6, then WIDGET_ROW px per widget, +8; the title bar (TITLE px) and the newer frontend's source badge (BADGE px)
# sit above its pos. A multiline text box is given MULTILINE px (both frontends stretch it to the node) and the
# LoadImage preview IMAGE_PREVIEW px (the 1.27 frontend's preview widget is 220 px). Widget text is 12 px Arial,
# or where there is none (Debian's Chromium) DejaVu Sans, which is wider: a combo draws its label from x=35 and its
# value right-aligned to width-50 (the 1.27 frontend truncates what does not fit), so a value shows whole, clear of
# the label, when width >= label + value + COMBO_CHROME.
TITLE, BADGE, SLOT_ROW, WIDGET_ROW, MULTILINE, IMAGE_PREVIEW = 30, 24, 20, 24, 100, 240
NODE_WIDTH, COMBO_CHROME, GAP_X, GAP_Y, ORIGIN = 360, 100, 60, 20, (40, 80)
# advance widths in 1/1000 em, the wider of Arial's and DejaVu Sans' rounded up; 1000 for any other character
GLYPH_WIDTH = {chars: width for width, chars in (
    (280, "ijl"), (320, ". "), (360, "f-"), (400, "t()"), (420, "rIJ"), (560, "csz_*L"), (600, "kvxy"), (620, "FT"),
    (640, "abdeghnopqu0123456789"), (690, "ABEKPSVXYZ"), (790, "CDGHNOQRU"))}
GLYPH_WIDTH = {ch: width for chars, width in GLYPH_WIDTH.items() for ch in chars}


def text_width(text: str, px: int = 12) -> float:
    return sum(GLYPH_WIDTH.get(ch, 1000) for ch in str(text)) * px / 1000


def widget_values(class_type: str, values: dict) -> list:
    """The node's widgets_values: each widget's value, and "fixed" after a seed (its control_after_generate)."""
    out = []
    for name, value in widgets(class_type, values):
        out.append(value)
        if spec.SPEC.get(name) and spec.SPEC[name].widget.get("control_after_generate"):
            out.append("fixed")  # keep the seed the workflow says
    return out


def node_size(class_type: str, links: dict, outputs: list, values: dict) -> List[int]:
    """The [width, height] a node is drawn at (title bar excluded), from its slots and widgets (see above)."""
    rows = max(len(links) + len(spec.OPTIONAL_IMAGES.get(class_type, ())), len(outputs), 1)
    multiline = {p.name for p in spec.node_params(class_type) if p.widget.get("multiline")} if class_type != "LoadImage" else set()
    height = rows * SLOT_ROW + 6 + 8 + WIDGET_ROW * (len(widget_values(class_type, values)) - len(multiline))
    height += MULTILINE * len(multiline) + (IMAGE_PREVIEW if class_type == "LoadImage" else 0)
    width = NODE_WIDTH
    for name, value in widgets(class_type, values):
        if isinstance(value, str) and name not in multiline:  # a combo or a one-line text: label and value
            width = max(width, text_width(name) + text_width(value) + COMBO_CHROME)
    return [int(-(-width // 10) * 10), int(-(-height // 10) * 10)]


def lay_out(nodes: list) -> list:
    """Columns left to right along the links (a node's column is one past its furthest source's), each column's nodes
    stacked top to bottom in graph order, every node placed below the drawn box of the one above it (title bar and
    badge included) and every column right of the widest node of the one before: no node covers another."""
    column: Dict[int, int] = {}
    by_id = {n[0]: n for n in nodes}

    def column_of(node_id: int) -> int:
        if node_id not in column:
            sources = [src for src, _, _ in by_id[node_id][3].values()]
            column[node_id] = 1 + max((column_of(src) for src in sources), default=-1)
        return column[node_id]

    sizes = {n[0]: node_size(n[1], n[3], n[4], n[6]) for n in nodes}
    x, placed = ORIGIN[0], {}
    for index in range(1 + max(column_of(n[0]) for n in nodes)):
        y = ORIGIN[1]
        members = [n[0] for n in nodes if column_of(n[0]) == index]
        for node_id in members:
            placed[node_id] = (x, y)
            y += sizes[node_id][1] + GAP_Y + TITLE + BADGE
        x += max(sizes[m][0] for m in members) + GAP_X
    return [(*n[:5], placed[n[0]], *n[6:]) for n in nodes]


def widgets(class_type: str, values: dict):
    if class_type == "LoadImage":
        return CORE_IMAGE_WIDGETS
    return [(p.name, values.get(p.name, p.default)) for p in spec.node_params(class_type)]


def api_workflow(preset: str = "none") -> dict:
    workflow = {}
    for node_id, class_type, title, links, _, _, values in graph(preset):
        inputs = {name: value for name, value in widgets(class_type, values) if name != "upload"}
        inputs.update({name: [str(src), slot] for name, (src, slot, _) in links.items()})
        workflow[str(node_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return workflow


def ui_workflow(preset: str = "none") -> dict:
    nodes_in = graph(preset)
    links, nodes = [], []
    outputs_links: Dict[tuple, list] = {}
    for node_id, _, _, node_links, _, _, _ in nodes_in:
        for name, (src, slot, kind) in sorted(node_links.items(), key=lambda item: LINK_ORDER[item[0]]):
            link_id = len(links) + 1
            links.append([link_id, src, slot, node_id, sorted(node_links, key=LINK_ORDER.get).index(name), kind])
            outputs_links.setdefault((src, slot), []).append(link_id)
    link_by_target = {(link[3], link[4]): link[0] for link in links}
    for order, (node_id, class_type, title, node_links, outputs, pos, preset_values) in enumerate(nodes_in):
        values = widget_values(class_type, preset_values)
        linked = sorted(node_links, key=LINK_ORDER.get)  # a widget's input fed by a link names its widget
        nodes.append({
            "id": node_id, "type": class_type, "title": title, "pos": list(pos),
            "size": node_size(class_type, node_links, outputs, preset_values),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": node_links[name][2], "link": link_by_target[(node_id, i)],
                        **({"widget": {"name": name}} if name in dict(widgets(class_type, preset_values)) else {})}
                       for i, name in enumerate(linked)]
                      + [{"name": name, "type": "IMAGE", "link": None} for name, _ in spec.OPTIONAL_IMAGES.get(class_type, ())],
            "outputs": [{"name": name, "type": kind, "links": outputs_links.get((node_id, slot), []), "slot_index": slot}
                        for slot, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": values,
        })
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


# ---------------------------------------------------------------------------------------------- template cards
# web/wan22_templates.json: the template browser's card of each shipped workflow, in the format of ComfyUI's own
# templates/index.json (a category with its templates). The Vue frontend reads no title or description for a
# pack's example_workflows/ (it shows the file name for both); web/wan22_templates.js hands it this category
# instead. The thumbnail is example_workflows/<name>.jpg, the file the frontend requests for a pack's template
# (python -m scripts.thumbnails). The frontend turns "-" and "_" of a pack template's description into spaces.
TEMPLATE_INDEX = "web/wan22_templates.json"
TEMPLATE_CATEGORY = "Wan2.2 I2V-A14B"


def template_cards() -> Dict[str, tuple]:
    """{preset: (title, description)} of the shipped workflows' template cards, numbers from the spec. A card shows
    two lines of its description, about 50 characters (the rest on hover)."""
    d, fast, motion = spec.default, spec.PRESETS["4step"], spec.PRESETS["4step_motion"]
    width, height = d("size").split("*")
    return {
        "none": ("Wan2.2 Image to Video (A14B)",
                 f"{d('frame_num')} frames at {width}x{height}: the upstream {d('sample_steps')} steps."),
        "4step": ("Wan2.2 Image to Video, 4 steps (LoRA)",
                  f"lightx2v LoRAs: {fast['sample_steps']} {fast['sample_solver']} steps at guidance "
                  f"{fast['guide_scale_low']}."),
        "4step_motion": ("Wan2.2 Image to Video, 4 steps with motion",
                         f"{motion['sample_steps']} steps: the first {motion['motion_steps']} without LoRAs, "
                         f"guidance {motion['motion_guide_scale']}."),
        EXTEND: ("Wan2.2 Image to Video with Prompt Extension",
                 "Qwen2.5 VL or DashScope extends the prompt first."),
        LONG: ("Wan2.2 long video: clips chained",
               f"{LONG_VIDEO[spec.I2V]['segments']} clips of {d('frame_num')} frames, a prompt each: "
               f"{spec.video_frames(d('frame_num'), LONG_VIDEO[spec.I2V]['segments'])} frames."),
    }


def template_index() -> list:
    templates = []
    for preset, (title, description) in template_cards().items():
        assert not set("-_") & set(description), f"the card would show {description!r} with spaces for - and _"
        assert len(description) <= 50, f"a card shows two lines of {description!r}, cut"
        templates.append({"name": WORKFLOWS[preset].removesuffix(".json"), "title": title, "description": description,
                          "mediaType": "image", "mediaSubtype": "jpg"})
    # moduleName: the pack's folder in custom_nodes, whatever it is named (the extension sets the real one)
    return [{"moduleName": "comfyui-wan22-i2v", "title": TEMPLATE_CATEGORY, "type": "video", "templates": templates}]


# ---------------------------------------------------------------------------------------------- docs
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return f"`{value}`"


def parameters_table() -> str:
    rows = ["| parameter | aliases | default | allowed | node input | CLI | worker | meaning |",
            "|---|---|---|---|---|---|---|---|"]
    for p in spec.PARAMS:
        cli = (", ".join(_code(f) for f in p.flags) if p.flag else "batch / Python") if p.taken_by("cli") else f"no: {p.refused['cli']}"
        worker = "yes" if p.taken_by("worker") else f"no: {p.refused['worker']}"
        if p.operator:
            worker = f"the operator's `{p.operator}` replaces a request's value (with a warning)"
        default = spec.shown_default(p)
        rows.append("| " + " | ".join(_cell(c) for c in (
            _code(p.name), ", ".join(_code(a) for a in p.aliases), default if default.startswith("upstream") or default == "none" else _code(default),
            p.allowed, _code(p.node) if p.node else "", cli, worker, p.doc)) + " |")
    return "\n".join(rows)


def settings_table(settings: List[Setting]) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {_cell(s.default_text)} | {_cell(s.doc)} |" for s in settings]
    return "\n".join(rows)


def generated_blocks() -> Dict[str, str]:
    from runpod_worker.config import WORKER_SETTINGS

    return {"parameters": parameters_table(), "limits": settings_table(list(LIMIT_SETTINGS)),
            "worker-settings": settings_table(list(WORKER_SETTINGS)), "memory-settings": settings_table(list(MEMORY_SETTINGS))}


BLOCK = re.compile(r"(<!-- generated: ([\w-]+) \(python -m scripts.regenerate\) -->\n)(.*?)(<!-- end generated -->)", re.S)
DOCS = ["docs/parameters.md", "docs/runpod.md", "docs/memory.md"]


def fill_blocks(text: str, blocks: Dict[str, str]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group(2)] + "\n" + m.group(4), text)


def outputs() -> Dict[Path, str]:
    """Every generated file with the text it must have."""
    # Subfolders of workflows/: newer ComfyUI also lists <pack>/workflows/*.json as templates but serves
    # only example_workflows/, so top-level files there would show as duplicate or broken templates.
    files = {}
    for preset, name in WORKFLOWS.items():
        api, ui = api_workflow(preset), ui_workflow(preset)
        for folder, workflow in (("workflows/api", api), ("workflows/ui", ui), ("example_workflows", ui)):
            files[REPO / folder / name] = json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"
    files[REPO / TEMPLATE_INDEX] = json.dumps(template_index(), indent=2, ensure_ascii=False) + "\n"
    blocks = generated_blocks()
    for doc in DOCS:
        path = REPO / doc
        files[path] = fill_blocks(path.read_text(encoding="utf-8"), blocks)
    return files


def stale() -> List[Path]:
    return [path for path, text in outputs().items() if not path.is_file() or path.read_text(encoding="utf-8") != text]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.regenerate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which generated files are stale (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"stale: {path.relative_to(REPO)} (run python -m scripts.regenerate)", file=sys.stderr)
        return 1 if old else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
