"""Write the shipped workflows (API and UI format) from one description, so both always agree.

    .venv/bin/python -m scripts.build_workflows
"""
from __future__ import annotations

import json
from pathlib import Path

from wan22.params import UPSTREAM_NEGATIVE_PROMPT, GenerationParams

REPO = Path(__file__).resolve().parents[1]
D = GenerationParams()
EXAMPLE_PROMPT = "cinematic winter summit, steady pan, subtle parallax"

# id, class_type, title, widget inputs (declaration order), linked inputs {name: (from_id, slot, type)}, outputs [(name, type)], pos
NODES = [
    (1, "Wan22ModelLoader", "Wan2.2 Model Loader",
     [("model_set", "default (WAN_CKPT_DIR)"), ("model_path", ""), ("dtype", "bf16"), ("offload_model", True),
      ("t5_cpu", True), ("convert_model_dtype", True)],
     {}, [("model", "WAN22_MODEL")], (40, 80)),
    (2, "LoadImage", "Reference Image",
     [("image", "example.png"), ("upload", "image")],
     {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")], (40, 360)),
    (3, "Wan22TextEncode", "Wan2.2 Text Encode",
     [("prompt", EXAMPLE_PROMPT), ("negative_prompt", UPSTREAM_NEGATIVE_PROMPT)],
     {"model": (1, 0, "WAN22_MODEL")}, [("text", "WAN22_TEXT")], (420, 80)),
    (4, "Wan22ImageToVideo", "Wan2.2 Image to Video",
     [("size", D.size), ("frame_num", D.frame_num), ("sample_steps", D.sample_steps),
      ("guide_scale_low", D.guide_scale[0]), ("guide_scale_high", D.guide_scale[1]), ("sample_shift", D.sample_shift),
      ("sample_solver", D.sample_solver), ("seed", D.seed), ("boundary", D.boundary)],
     {"model": (1, 0, "WAN22_MODEL"), "text": (3, 0, "WAN22_TEXT"), "image": (2, 0, "IMAGE")},
     [("frames", "IMAGE"), ("seed", "INT")], (820, 80)),
    (5, "Wan22SaveVideo", "Wan2.2 Save Video",
     [("filename_prefix", "Wan22/i2v"), ("fps", D.fps)],
     {"images": (4, 0, "IMAGE")}, [("path", "STRING")], (1220, 80)),
]
LINK_ORDER = {"model": 0, "text": 1, "image": 2, "images": 0}


def api_workflow() -> dict:
    workflow = {}
    for node_id, class_type, title, widgets, links, _, _ in NODES:
        inputs = {name: value for name, value in widgets if not (class_type == "LoadImage" and name == "upload")}
        inputs.update({name: [str(src), slot] for name, (src, slot, _) in links.items()})
        workflow[str(node_id)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return workflow


def ui_workflow() -> dict:
    links, nodes = [], []
    outputs_links = {}
    next_link = 1
    for node_id, _, _, _, node_links, _, _ in NODES:
        for name, (src, slot, kind) in sorted(node_links.items(), key=lambda item: LINK_ORDER[item[0]]):
            links.append([next_link, src, slot, node_id, list(sorted(node_links, key=LINK_ORDER.get)).index(name), kind])
            outputs_links.setdefault((src, slot), []).append(next_link)
            next_link += 1
    link_by_target = {(l[3], l[4]): l[0] for l in links}
    for order, (node_id, class_type, title, widgets, node_links, outputs, pos) in enumerate(NODES):
        values = []
        for name, value in widgets:
            values.append(value)
            if name == "seed":
                values.append("fixed")  # control_after_generate: keep the seed the workflow says
        linked = sorted(node_links, key=LINK_ORDER.get)
        nodes.append({
            "id": node_id, "type": class_type, "title": title, "pos": list(pos), "size": [360, 260 if len(values) > 4 else 160],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": node_links[name][2], "link": link_by_target[(node_id, i)]} for i, name in enumerate(linked)],
            "outputs": [{"name": name, "type": kind, "links": outputs_links.get((node_id, slot), []), "slot_index": slot}
                        for slot, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": values,
        })
    return {"last_node_id": len(NODES), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    api, ui = api_workflow(), ui_workflow()
    # Subfolders of workflows/: newer ComfyUI also lists <pack>/workflows/*.json as templates but serves
    # only example_workflows/, so top-level files there would show as duplicate or broken templates.
    targets = {"workflows/api": api, "workflows/ui": ui, "example_workflows": ui}
    for folder, workflow in targets.items():
        (REPO / folder).mkdir(parents=True, exist_ok=True)
        (REPO / folder / "wan22_i2v_a14b.json").write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")

if __name__ == "__main__":
    main()
