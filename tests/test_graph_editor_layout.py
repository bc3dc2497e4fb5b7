"""The shipped UI workflows as the graph editor draws them: each example_workflows/*.json is loaded into the real
ComfyUI page in headless Chromium, every node is drawn at scale 1, and the boxes the frontend drew are read back
from the live graph (pos, size after the frontend computed it, the title bar and the newer frontend's source badge
above pos). No node covers another, every widget ends inside its node, the columns follow the links left to right,
and every text the frontend draws for a node (a long LoRA file name included) lies inside that node. The same checks
catch a node moved onto another, a backwards column and a LoRA node too narrow for its file name (the controls).

The reference image is a real file in the server's input folder (example.png, as in a ComfyUI checkout), so
LoadImage is measured with its preview drawn, the size a user sees.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from graph_editor import load_workflow, open_editor

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.name for path in (REPO / "example_workflows").glob("*.json"))
FOUR_STEP = "wan22_i2v_a14b_4step_lora.json"
TOLERANCE = 0.5  # px: sizes are floats on the newer frontend

# Each node drawn alone at scale 1 (both frontends skip nodes off screen and widget text when zoomed out), two
# animation frames later drawn once more with CanvasRenderingContext2D.fillText and the canvas' drawNode wrapped,
# to record every text drawn for that node with its extent in graph coordinates; then its geometry is read.
MEASURE_JS = r"""
(async () => {
  const T = LiteGraph.NODE_TITLE_HEIGHT, WH = LiteGraph.NODE_WIDGET_HEIGHT || 20;
  const canvas = app.canvas, ds = canvas.ds;
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const badgeHeight = n => {  // the 1.27 frontend draws its badges above the title bar, 2 px apart from it
    let h = 0;
    for (const b of n.badges || []) { const badge = typeof b === 'function' ? b() : b; if (badge) h = Math.max(h, (badge.height ?? 20) + 2); }
    return h;
  };
  const widgetHeight = (n, w) => {
    if (w.computedHeight != null) return w.computedHeight;
    if (w.computeSize) { const s = w.computeSize(n.size[0]); if (s) return s[1]; }
    return WH;
  };
  const proto = CanvasRenderingContext2D.prototype, fillText = proto.fillText;
  const ownDrawNode = Object.prototype.hasOwnProperty.call(canvas, 'drawNode'), drawNode = canvas.drawNode;
  const nodes = [];
  for (const n of app.graph._nodes) {
    ds.scale = 1; ds.offset = [150 - n.pos[0], 150 - n.pos[1]];
    app.graph.setDirtyCanvas(true, true); canvas.draw(true, true);
    await frames();
    const texts = [];
    let current = null;
    canvas.drawNode = function (node, ctx) { current = node; try { return drawNode.apply(this, arguments); } finally { current = null; } };
    proto.fillText = function (text, x, y, maxWidth) {
      if (current === n && String(text).trim()) {
        let width = this.measureText(String(text)).width;
        if (maxWidth != null) width = Math.min(width, maxWidth);
        const align = this.textAlign;
        const x0 = align === 'right' || align === 'end' ? x - width : align === 'center' ? x - width / 2 : x;
        const t = this.getTransform();
        const graph = (px, py) => [(t.a * px + t.c * py + t.e) / ds.scale - ds.offset[0],
                                   (t.b * px + t.d * py + t.f) / ds.scale - ds.offset[1]];
        const [left, baseline] = graph(x0, y), [right] = graph(x0 + width, y);
        texts.push({text: String(text), left, right, baseline});
      }
      return fillText.apply(this, arguments);
    };
    try { app.graph.setDirtyCanvas(true, true); canvas.draw(true, true); }
    finally { proto.fillText = fillText; if (ownDrawNode) canvas.drawNode = drawNode; else delete canvas.drawNode; }
    nodes.push({
      id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size], computed: [...n.computeSize()],
      title_height: T, badge_height: badgeHeight(n), texts,
      widgets: (n.widgets || []).map(w => ({
        name: w.name, type: String(w.type), value: typeof w.value === 'object' ? null : w.value,
        y: w.last_y ?? w.y ?? null, height: widgetHeight(n, w),
        hidden: !!w.hidden || String(w.type).startsWith('converted-widget'),
      })),
    });
  }
  ds.scale = 1; ds.offset = [20, 40];
  app.graph.setDirtyCanvas(true, true); canvas.draw(true, true);
  await frames();
  const links = Object.values(app.graph.links || {}).filter(Boolean).map(l => [l.id, l.origin_id, l.target_id]);
  return {nodes, links};
})()
"""

IMAGE_SHOWN_JS = ("(() => { const n = app.graph._nodes.find(n => n.type === 'LoadImage');"
                  " return !n || (!!n.imgs && n.imgs.length > 0 && !!n.imgs[0].complete && n.imgs[0].naturalWidth > 0); })()")


def shipped(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def editor(browser, comfy_server):
    """The editor open on the server's page, with an example.png in its input folder (the shipped LoadImage's),
    removed again afterwards: the server is shared, and the other modules' LoadImage has no preview widget."""
    example = Path(comfy_server.input_dir) / "example.png"
    created = not example.is_file()
    if created:
        example.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "docs" / "icon.png", example)
    try:
        open_editor(browser, comfy_server, shipped(SHIPPED[0]))
        yield browser
    finally:
        if created:
            example.unlink(missing_ok=True)


def measure(browser, workflow: dict) -> dict:
    """Load ``workflow``, let the frontend draw it (the reference image included), and read back what it drew."""
    graph = load_workflow(browser, workflow)
    assert graph["missing_dialog"] is None and not graph["dialog_visible"], graph["dialog_text"]
    browser.wait_for(IMAGE_SHOWN_JS, timeout=20, what="LoadImage's preview of example.png")
    layout = browser.evaluate(MEASURE_JS, timeout=60)
    layout["file"] = {n["id"]: n for n in workflow["nodes"]}
    return layout


@pytest.fixture(scope="module")
def measured(editor):
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = measure(editor, shipped(name))
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------ the checks
def box(node: dict) -> tuple:
    """(left, top, right, bottom) of what is drawn for a node: its body, the title bar and badge above pos."""
    x, y = node["pos"]
    width, height = node["size"]
    return (x, y - node["title_height"] - node["badge_height"], x + width, y + height)


def name(node: dict) -> str:
    return f"{node['title']!r} ({node['type']} #{node['id']}, box {[round(v) for v in box(node)]})"


def overlaps(layout: dict) -> list:
    problems, nodes = [], layout["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (al, at, ar, ab), (bl, bt, br, bb) = box(a), box(b)
            if al < br and bl < ar and at < bb and bt < ab:
                problems.append(f"{name(a)} and {name(b)} overlap")
    return problems


def widgets_outside(layout: dict) -> list:
    problems = []
    for node in layout["nodes"]:
        for w in node["widgets"]:
            if w["hidden"] or w["height"] <= 0:
                continue
            if w["y"] is None:
                problems.append(f"{name(node)}: widget {w['name']!r} was not drawn")
            elif w["y"] < 0 or w["y"] + w["height"] > node["size"][1] + TOLERANCE:
                problems.append(f"{name(node)}: widget {w['name']!r} spans y {w['y']:.0f}..{w['y'] + w['height']:.0f},"
                                f" outside the node's height {node['size'][1]:.0f}")
    return problems


def sizes_not_kept(layout: dict) -> list:
    """A node the frontend drew at another size than the file's, or smaller than it computes for its content."""
    problems = []
    for node in layout["nodes"]:
        want = layout["file"][node["id"]]["size"]
        if any(abs(got - wanted) > TOLERANCE for got, wanted in zip(node["size"], want)):
            problems.append(f"{name(node)}: drawn at size {[round(v) for v in node['size']]}, the file says {want}")
        if any(got + TOLERANCE < needed for got, needed in zip(node["size"], node["computed"])):
            problems.append(f"{name(node)}: size {[round(v) for v in node['size']]} is smaller than the"
                            f" {[round(v) for v in node['computed']]} its content needs")
    return problems


def links_backwards(layout: dict) -> list:
    by_id = {n["id"]: n for n in layout["nodes"]}
    problems = []
    for link_id, origin, target in layout["links"]:
        source, dest = by_id[origin], by_id[target]
        if not box(source)[2] <= box(dest)[0]:
            problems.append(f"link {link_id} runs from {name(source)} to {name(dest)}, which does not start right of"
                            " where its source ends")
    return problems


def texts_outside(layout: dict) -> list:
    problems = []
    for node in layout["nodes"]:
        left, top, right, bottom = box(node)
        for t in node["texts"]:
            if t["left"] < left - TOLERANCE or t["right"] > right + TOLERANCE or not top <= t["baseline"] <= bottom:
                problems.append(f"{name(node)}: the text {t['text']!r} is drawn at x {t['left']:.0f}..{t['right']:.0f},"
                                f" baseline y {t['baseline']:.0f}, outside the node")
    return problems


def lora_names_cut(layout: dict) -> list:
    """Each LoRA node's file name drawn whole (not truncated), inside the node and clear of its label."""
    problems = []
    for node in layout["nodes"]:
        if node["type"] != "Wan22LoraLoader":
            continue
        value = next(w["value"] for w in node["widgets"] if w["name"] == "lora_name")
        drawn = [t for t in node["texts"] if t["text"] == value]
        labels = [t for t in node["texts"] if t["text"] == "lora_name"]
        if not drawn:
            near = [t["text"] for t in node["texts"] if t["text"][:8] == value[:8]]
            problems.append(f"{name(node)}: its LoRA {value!r} is not drawn whole (drawn: {near})")
            continue
        x, _, right, _ = box(node)
        t = drawn[0]
        if t["left"] < x or t["right"] > right:
            problems.append(f"{name(node)}: its LoRA {value!r} is drawn at x {t['left']:.0f}..{t['right']:.0f},"
                            " outside the node")
        if labels and t["left"] < labels[0]["right"] + 4:
            problems.append(f"{name(node)}: its LoRA {value!r} (from x {t['left']:.0f}) runs into the label"
                            f" lora_name (ending at x {labels[0]['right']:.0f})")
    return problems


# ------------------------------------------------------------------------------------------------ the shipped files
@pytest.mark.parametrize("workflow", SHIPPED)
def test_no_node_covers_another(measured, workflow):
    problems = overlaps(measured(workflow))
    assert not problems, f"{workflow}: nodes drawn over each other:\n" + "\n".join(problems)


@pytest.mark.parametrize("workflow", SHIPPED)
def test_every_widget_ends_inside_its_node(measured, workflow):
    layout = measured(workflow)
    assert sum(len(n["widgets"]) for n in layout["nodes"]) >= 20, "too few widgets read back: nothing measured?"
    problems = widgets_outside(layout)
    assert not problems, f"{workflow}: widgets hidden outside their node:\n" + "\n".join(problems)


@pytest.mark.parametrize("workflow", SHIPPED)
def test_nodes_are_drawn_at_the_files_size(measured, workflow):
    problems = sizes_not_kept(measured(workflow))
    assert not problems, f"{workflow}: nodes resized on load:\n" + "\n".join(problems)


@pytest.mark.parametrize("workflow", SHIPPED)
def test_columns_follow_the_links_left_to_right(measured, workflow):
    layout = measured(workflow)
    assert len(layout["links"]) >= 5
    problems = links_backwards(layout)
    assert not problems, f"{workflow}: not readable left to right:\n" + "\n".join(problems)


@pytest.mark.parametrize("workflow", SHIPPED)
def test_every_text_drawn_for_a_node_is_inside_it(measured, workflow):
    layout = measured(workflow)
    for node in layout["nodes"]:  # the title at least: the recording saw the node being drawn
        assert any(t["text"] == node["title"] for t in node["texts"]), (name(node), [t["text"] for t in node["texts"]])
    problems = texts_outside(layout)
    assert not problems, f"{workflow}: text drawn outside its node:\n" + "\n".join(problems)


def test_long_lora_names_are_drawn_whole_inside_their_node(measured):
    layout = measured(FOUR_STEP)
    names = sorted(w["value"] for n in layout["nodes"] for w in n["widgets"] if w["name"] == "lora_name")
    assert names == ["wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
                     "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"]
    problems = lora_names_cut(layout)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ controls
def test_control_the_old_layout_is_caught_overlapping(editor):
    """The layout of issue 24: LoadImage at [40,240] under a Model Loader at [40,80] 346 px tall."""
    workflow = shipped("wan22_i2v_a14b.json")
    by_type = {n["type"]: n for n in workflow["nodes"]}
    by_type["Wan22ModelLoader"]["pos"] = [40, 80]
    by_type["LoadImage"]["pos"] = [40, 240]
    problems = overlaps(measure(editor, workflow))
    assert len(problems) == 1 and "Model Loader" in problems[0] and "Reference Image" in problems[0], problems


def test_control_a_backwards_column_is_caught(editor):
    workflow = shipped("wan22_i2v_a14b.json")
    by_type = {n["type"]: n for n in workflow["nodes"]}
    sampler, saver = by_type["Wan22ImageToVideo"], by_type["Wan22SaveVideo"]
    sampler["pos"], saver["pos"] = saver["pos"], sampler["pos"]
    problems = links_backwards(measure(editor, workflow))
    assert any("Save Video" in p for p in problems), problems


def test_control_a_lora_node_too_narrow_for_its_name_is_caught(editor):
    """The 4-step LoRA nodes at the 360 px every node had: the file name does not fit (the 2024 frontend draws it
    over the label and past the node's left edge, the 1.27 frontend truncates it)."""
    workflow = shipped(FOUR_STEP)
    for node in workflow["nodes"]:
        if node["type"] == "Wan22LoraLoader":
            node["size"] = [360, node["size"][1]]
    layout = measure(editor, workflow)
    assert len(lora_names_cut(layout)) >= 2, lora_names_cut(layout)
