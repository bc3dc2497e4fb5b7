"""The graph editor: headless Chromium (Debian ``chromium``) opens the real ComfyUI server's page, loads the shipped
UI workflow, finds no missing node types, shows the workflow's widget values, and saves a screenshot.

Chromium is driven over the Chrome DevTools Protocol with ``websocket-client`` (no browser-automation package).
Without a ``chromium`` binary the tests skip, unless ``WAN22_REQUIRE_COMFYUI=1`` (``make test`` / CI) makes that a
failure. The screenshot is written to the test's tmp_path and copied to tests/_artifacts/graph_editor.png.
"""
from __future__ import annotations

import json
import shutil
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import comfy_fixture as cf
from wan22.request import spec
from graph_editor import (READ_GRAPH_JS, VIEWPORT, bring_into_view, click, load_workflow, open_editor, type_value,
                          widget)

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

REPO = Path(__file__).resolve().parents[1]
UI_WORKFLOW = REPO / "workflows" / "ui" / "wan22_i2v_a14b.json"
EXAMPLE_WORKFLOW = REPO / "example_workflows" / "wan22_i2v_a14b.json"
EXPECTED_TYPES = ["Wan22ModelLoader", "LoadImage", "Wan22TextEncode", "Wan22ImageToVideo", "Wan22SaveVideo"]


@pytest.fixture(scope="module")
def loaded_graph(browser, comfy_server):
    """The server's page in Chromium with the shipped UI workflow loaded; returns the graph as read back."""
    workflow = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
    return {"workflow": workflow, "graph": open_editor(browser, comfy_server, workflow)}


def test_ui_workflow_loads_without_missing_nodes(loaded_graph, browser):
    graph, workflow = loaded_graph["graph"], loaded_graph["workflow"]
    assert graph["missing_dialog"] is None, f"ComfyUI reported missing node types: {graph['missing_dialog']}"
    assert not graph["dialog_visible"], f"a dialog is open after loading: {graph['dialog_text']}"
    types = sorted(n["type"] for n in graph["nodes"])
    assert types == sorted(EXPECTED_TYPES), types
    assert sorted(n["type"] for n in workflow["nodes"]) == sorted(EXPECTED_TYPES)
    unregistered = [n["type"] for n in graph["nodes"] if not n["registered"]]
    assert not unregistered, f"placeholder nodes for unregistered types: {unregistered}"
    errored = [n["type"] for n in graph["nodes"] if n["has_errors"]]
    assert not errored, f"nodes flagged has_errors: {errored}"
    assert not browser.page_errors(), f"uncaught page errors: {browser.page_errors()}"
    # the same wiring as the file: every link, no input left unconnected but the optional ones (last_image)
    assert sorted(map(tuple, graph["links"])) == sorted(map(tuple, workflow["links"]))
    # (the newer frontend gives every widget an input slot too: those stay unlinked and keep their widget value)
    for node in graph["nodes"]:
        optional = {name for name, _ in spec.OPTIONAL_IMAGES.get(node["type"], ())}
        unlinked = [i["name"] for i in node["inputs"] if not i["widget"] and i["link"] is None]
        assert set(unlinked) == optional, (node["type"], node["inputs"])


def test_widget_values_match_the_workflow(loaded_graph):
    graph, workflow = loaded_graph["graph"], loaded_graph["workflow"]
    by_id = {n["id"]: n for n in graph["nodes"]}
    for wf_node in workflow["nodes"]:
        node = by_id[wf_node["id"]]
        assert node["type"] == wf_node["type"]
        assert node["title"] == wf_node.get("title", node["title"])
        assert node["widgets_values"] == wf_node["widgets_values"], node["type"]
        assert [w["value"] for w in node["widgets"]] == wf_node["widgets_values"], node["type"]
    sampler = {w["name"]: w["value"] for w in next(n for n in graph["nodes"] if n["type"] == "Wan22ImageToVideo")["widgets"]}
    assert sampler["size"] == "1280*720"
    assert sampler["frame_num"] == 81
    assert sampler["sample_steps"] == 40
    assert sampler["sample_solver"] == "unipc"
    assert sampler["guide_scale_low"] == 3.5 and sampler["guide_scale_high"] == 3.5
    assert sampler["sample_shift"] == 5.0 and sampler["boundary"] == 0.9
    assert sampler["seed"] == -1
    loader = {w["name"]: w["value"] for w in next(n for n in graph["nodes"] if n["type"] == "Wan22ModelLoader")["widgets"]}
    assert loader["model_set"] == "default (WAN_CKPT_DIR)" and loader["dtype"] == "bf16"
    saver = {w["name"]: w["value"] for w in next(n for n in graph["nodes"] if n["type"] == "Wan22SaveVideo")["widgets"]}
    assert saver["fps"] == 16


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot(loaded_graph, browser, tmp_path):
    import base64

    data = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    path = tmp_path / "graph_editor.png"
    path.write_bytes(data)
    cf.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, cf.ARTIFACTS / "graph_editor.png")
    width, height = png_size(data)
    assert (width, height) == VIEWPORT
    assert len(data) > 20_000, f"screenshot only {len(data)} bytes: blank page?"
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        colors = img.convert("RGB").resize((192, 108)).getcolors(maxcolors=192 * 108)
    assert colors is None or len(colors) > 50, "screenshot is nearly uniform: nothing drawn?"


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_example_workflow_served_as_template(comfy_server):
    """Newer ComfyUI serves custom nodes' example_workflows/ to its template browser; the 2024 server does not."""
    server_py = cf.comfyui_dir() / "server.py"
    sources = server_py.read_text(encoding="utf-8", errors="replace")
    manager = cf.comfyui_dir() / "app" / "custom_node_manager.py"
    if manager.is_file():
        sources += manager.read_text(encoding="utf-8", errors="replace")
    if "workflow_templates" not in sources:
        pytest.skip(f"this ComfyUI ({server_py}) has no workflow_templates route (added upstream after March 2024); "
                    "example_workflows/ is listed by newer servers")
    listing = None
    for route in ("/api/workflow_templates", "/workflow_templates"):
        try:
            listing = _get_json(comfy_server.url + route)
            break
        except urllib.error.HTTPError:
            continue
    assert isinstance(listing, dict), "no workflow_templates listing"
    packs = [pack for pack, names in listing.items() if "wan22_i2v_a14b" in names]
    assert packs, f"wan22_i2v_a14b not among the templates: {listing}"
    # workflows/api and workflows/ui hold same-named files: they must not show up as extra or duplicate entries
    assert sorted(listing[packs[0]]) == sorted(set(listing[packs[0]])), f"duplicate templates: {listing[packs[0]]}"
    served = _get_json(f"{comfy_server.url}/api/workflow_templates/{packs[0]}/wan22_i2v_a14b.json")
    assert served == json.loads(EXAMPLE_WORKFLOW.read_text(encoding="utf-8"))
    # every template the browser lists for this pack must load (UI format): newer servers also scan workflows/
    for name in listing[packs[0]]:
        try:
            template = _get_json(f"{comfy_server.url}/api/workflow_templates/{packs[0]}/{name}.json")
        except urllib.error.HTTPError as exc:
            pytest.fail(f"template {name!r} is listed but not served ({exc}); listing: {listing[packs[0]]}")
        assert isinstance(template.get("nodes"), list), f"template {name!r} is not a UI workflow"


@pytest.mark.parametrize("name, steps, motion", [("wan22_i2v_a14b_4step_lora", 4, (0, 3.5)),
                                                  ("wan22_i2v_a14b_4step_motion", 6, (2, 3.5))])
def test_4step_workflow_loads_with_its_lora_nodes(loaded_graph, browser, name, steps, motion):
    """The shipped 4-step workflows: their two LoRA nodes resolve (the tiny lightx2v files are in a loras folder of
    the server), the widgets hold the recipe (the motion one: 6 steps, the first 2 without LoRAs at guidance 3.5),
    the links are the file's."""
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
    graph = load_workflow(browser, workflow)
    assert graph["missing_dialog"] is None and not graph["dialog_visible"], graph["dialog_text"]
    assert sorted(n["type"] for n in graph["nodes"]) == sorted(EXPECTED_TYPES + ["Wan22LoraLoader"] * 2)
    assert all(n["registered"] and not n["has_errors"] for n in graph["nodes"])
    assert sorted(map(tuple, graph["links"])) == sorted(map(tuple, workflow["links"]))
    by_id = {n["id"]: n for n in graph["nodes"]}
    for wf_node in workflow["nodes"]:
        assert [w["value"] for w in by_id[wf_node["id"]]["widgets"]] == wf_node["widgets_values"], wf_node["type"]
    sampler = {w["name"]: w["value"] for w in next(n for n in graph["nodes"] if n["type"] == "Wan22ImageToVideo")["widgets"]}
    assert (sampler["sample_steps"], sampler["sample_solver"], sampler["sample_shift"]) == (steps, "euler", 5.0)
    assert (sampler["motion_steps"], sampler["motion_guide_scale"]) == motion
    assert sampler["guide_scale_low"] == sampler["guide_scale_high"] == 1.0
    loras = sorted((w["lora_name"], w["strength_high"], w["strength_low"]) for w in (
        {x["name"]: x["value"] for x in n["widgets"]} for n in graph["nodes"] if n["type"] == "Wan22LoraLoader"))
    assert loras == [("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors", 1.0, 0.0),
                     ("wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors", 0.0, 1.0)]


def test_prompt_extend_workflow_loads_with_its_prompt_link(loaded_graph, browser):
    """The shipped prompt-extension workflow in the graph editor: the extension node resolves and its STRING
    output feeds the text encoder's prompt (a widget turned into an input), with the file's links and widgets."""
    workflow = json.loads((REPO / "example_workflows" / "wan22_i2v_a14b_prompt_extend.json").read_text(encoding="utf-8"))
    graph = load_workflow(browser, workflow)
    assert graph["missing_dialog"] is None and not graph["dialog_visible"], graph["dialog_text"]
    assert sorted(n["type"] for n in graph["nodes"]) == sorted(EXPECTED_TYPES + ["Wan22PromptExtend"])
    assert all(n["registered"] and not n["has_errors"] for n in graph["nodes"])
    assert sorted(map(tuple, graph["links"])) == sorted(map(tuple, workflow["links"]))
    extend = next(n for n in workflow["nodes"] if n["type"] == "Wan22PromptExtend")
    text = next(n for n in workflow["nodes"] if n["type"] == "Wan22TextEncode")
    assert [extend["id"], 0, text["id"], "STRING"] in [[l[1], l[2], l[3], l[5]] for l in graph["links"]]


def test_missing_node_detection_is_not_vacuous(loaded_graph, browser):
    """Control: a workflow with an unknown node type is caught by the same checks (dialog + placeholder node)."""
    workflow = json.loads(json.dumps(loaded_graph["workflow"]))
    bogus = dict(workflow["nodes"][-1], id=99, type="Wan22NoSuchNode", inputs=[], outputs=[], pos=[40, 600])
    workflow["nodes"].append(bogus)
    workflow["last_node_id"] = 99
    browser.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)", timeout=30)
    graph = browser.evaluate(READ_GRAPH_JS)
    assert graph["missing_dialog"] and "Wan22NoSuchNode" in graph["missing_dialog"]
    assert graph["dialog_visible"]
    assert [n["type"] for n in graph["nodes"] if not n["registered"]] == ["Wan22NoSuchNode"]
    browser.evaluate("(() => { app.ui.dialog.close();"
                     " document.querySelectorAll('[role=\"dialog\"] .p-dialog-close-button').forEach(b => b.click());"
                     " return true; })()")




@pytest.fixture()
def sampler_in_view(loaded_graph, browser):
    """The shipped UI workflow again, scale 1, with the sampler node near the top left of the canvas."""
    browser.evaluate(f"app.loadGraphData({json.dumps(loaded_graph['workflow'])}).then(() => true)", timeout=30)
    browser.settle(0.5)
    browser.evaluate(
        "(() => { const n = app.graph._nodes.find(n => n.type === 'Wan22ImageToVideo');"
        " app.canvas.ds.scale = 1; app.canvas.ds.offset = [200 - n.pos[0], 150 - n.pos[1]];"
        " app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);"
        " return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true)))); })()")
    return "Wan22ImageToVideo"


def arrows(browser, node: str, name: str, sides=("right", "left", "left")) -> list:
    """Click `name`'s arrows in turn; the value after each click."""
    seen = []
    for side in sides:
        click(browser, widget(browser, node, name)[side])
        seen.append(widget(browser, node, name)["value"])
    return seen


def test_frame_num_arrows_and_typing_reach_every_4n_plus_1(sampler_in_view, browser):
    """frame_num takes 4n+1 by its arrows (81 -> 85 -> 81 -> 77) and by typing (33), on both frontends: the 2024
    one rounded every INT to a multiple of its step (84, 80, 32) until web/wan22_widgets.js."""
    node = sampler_in_view
    assert widget(browser, node, "frame_num")["value"] == 81
    assert arrows(browser, node, "frame_num") == [85, 81, 77]
    for text, expected in (("33", 33), ("5", 5), ("1001", 1001), ("1", 1)):
        type_value(browser, node, "frame_num", text)
        assert widget(browser, node, "frame_num")["value"] == expected, text
    assert not browser.page_errors(), browser.page_errors()


def test_sample_steps_and_seed_take_every_integer(sampler_in_view, browser):
    node = sampler_in_view
    assert widget(browser, node, "sample_steps")["value"] == 40
    click(browser, widget(browser, node, "sample_steps")["right"])
    assert widget(browser, node, "sample_steps")["value"] == 41
    click(browser, widget(browser, node, "sample_steps")["left"])
    click(browser, widget(browser, node, "sample_steps")["left"])
    assert widget(browser, node, "sample_steps")["value"] == 39
    for text, expected in (("7", 7), ("1", 1), ("1000", 1000), ("33", 33)):
        type_value(browser, node, "sample_steps", text)
        assert widget(browser, node, "sample_steps")["value"] == expected, text
    type_value(browser, node, "seed", "12345")
    assert widget(browser, node, "seed")["value"] == 12345


def test_queue_from_the_editor_with_frame_num_typed_5(sampler_in_view, browser, comfy_server, input_image):
    """frame_num typed as 5 in the editor and queued as the editor queues: the run makes 5 frames (tiny models)."""
    from headless.client import ComfyClient

    client = ComfyClient(comfy_server.url)
    try:
        image = client.upload_image(input_image, name="wan22_editor_test.png")
        node = sampler_in_view
        browser.evaluate("(() => { const w = (t, n) => app.graph._nodes.find(x => x.type === t).widgets.find(x => x.name === n);"
                         f" w('LoadImage', 'image').value = {json.dumps(image)}; w('{node}', 'size').value = '96*64';"
                         " return true; })()")
        type_value(browser, node, "frame_num", "5")
        type_value(browser, node, "sample_steps", "2")
        assert (widget(browser, node, "frame_num")["value"], widget(browser, node, "sample_steps")["value"]) == (5, 2)
        before = set(_get_json(comfy_server.url + "/history"))
        browser.evaluate("app.queuePrompt(0, 1).then(() => true)", timeout=60)
        deadline = time.monotonic() + 30
        new = set()
        while not new and time.monotonic() < deadline:
            queue = _get_json(comfy_server.url + "/queue")
            new = {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
            new |= set(_get_json(comfy_server.url + "/history")) - before
            time.sleep(0.2)
        assert len(new) == 1, f"the editor queued {len(new)} prompts"
        entry = client.wait(new.pop(), timeout=300)
        sampler_id = str(browser.evaluate("app.graph._nodes.find(n => n.type === 'Wan22ImageToVideo').id"))
        info = entry["outputs"][sampler_id]["wan22"][0]
        assert (info["frames"], info["width"], info["height"]) == (5, 96, 64)
    finally:
        client.close()


def _upload(comfy_server, input_image) -> str:
    from headless.client import ComfyClient

    client = ComfyClient(comfy_server.url)
    try:
        return client.upload_image(input_image, name="wan22_editor_test.png")
    finally:
        client.close()


def _queue_and_read_errors(browser, js_setting_widgets: str) -> list:
    """Set widgets (`w(type, name)` is a widget), queue as the editor does, and return the (input, details) of each
    node error the server answered; the error dialog is closed afterwards (its text is returned last)."""
    browser.evaluate("(() => { const w = (t, n) => app.graph._nodes.find(x => x.type === t).widgets.find(x => x.name === n);"
                     f" {js_setting_widgets}; return true; }})()")
    browser.evaluate("app.queuePrompt(0, 1).then(() => true, () => true)", timeout=60)
    browser.wait_for("!!app.lastNodeErrors && Object.keys(app.lastNodeErrors).length > 0", timeout=20,
                     what="the server's node errors in the editor")
    browser.settle(0.5)
    errors = browser.evaluate("JSON.parse(JSON.stringify(app.lastNodeErrors))")
    shown = [(e["extra_info"]["input_name"], e["details"]) for node in errors.values() for e in node["errors"]]
    text = browser.evaluate(READ_GRAPH_JS)["dialog_text"] or ""
    browser.evaluate("(() => { app.ui.dialog.close();"
                     " document.querySelectorAll('[role=\"dialog\"] .p-dialog-close-button').forEach(b => b.click());"
                     " return true; })()")
    return shown + [text]


def test_a_bad_frame_num_is_shown_once_under_its_input(sampler_in_view, browser, comfy_server, input_image):
    """A workflow whose frame_num is 50, queued from the editor: the error is shown once, under frame_num (the 2024
    server reported it under each of the sampler's nine spec inputs)."""
    image = _upload(comfy_server, input_image)
    *shown, text = _queue_and_read_errors(browser, f"w('LoadImage', 'image').value = {json.dumps(image)};"
                                                   f" w('{sampler_in_view}', 'frame_num').value = 50")
    assert shown == [("frame_num", "frame_num - frame_num: must be 4n+1 (e.g. 5, 33, 49, 81), got 50")], shown
    assert text.count("must be 4n+1") == 1, f"the editor shows the problem more than once or not at all: {text}"


def test_float_and_fps_widgets_step_and_take_typed_values(sampler_in_view, browser):
    """The other widgets with a step: the guide scales and the shift (0.1), boundary (0.001), fps (an integer)."""
    node = sampler_in_view
    for name, start, step, typed in (("guide_scale_low", 3.5, 0.1, "4.2"), ("sample_shift", 5.0, 0.1, "8.7"),
                                     ("boundary", 0.9, 0.001, "0.875")):
        assert widget(browser, node, name)["value"] == pytest.approx(start), name
        click(browser, widget(browser, node, name)["right"])
        assert widget(browser, node, name)["value"] == pytest.approx(start + step), name
        click(browser, widget(browser, node, name)["left"])
        click(browser, widget(browser, node, name)["left"])
        assert widget(browser, node, name)["value"] == pytest.approx(start - step), name
        type_value(browser, node, name, typed)
        assert widget(browser, node, name)["value"] == pytest.approx(float(typed)), name
    bring_into_view(browser, "Wan22SaveVideo")
    assert widget(browser, "Wan22SaveVideo", "fps")["value"] == 16
    click(browser, widget(browser, "Wan22SaveVideo", "fps")["right"])
    assert widget(browser, "Wan22SaveVideo", "fps")["value"] == 17
    type_value(browser, "Wan22SaveVideo", "fps", "25")
    assert widget(browser, "Wan22SaveVideo", "fps")["value"] == 25


def test_the_motion_split_steps_and_takes_typed_values_and_too_many_motion_steps_are_shown_under_their_input(
        sampler_in_view, browser, comfy_server, input_image):
    """motion_steps by its arrows (0 -> 1 -> 0, never below 0) and by typing; motion_guide_scale by 0.1 and typing;
    more motion steps than steps, queued from the editor, is shown once, under motion_steps."""
    node = sampler_in_view
    assert widget(browser, node, "motion_steps")["value"] == 0
    assert arrows(browser, node, "motion_steps") == [1, 0, 0]
    type_value(browser, node, "motion_steps", "2")
    assert widget(browser, node, "motion_steps")["value"] == 2
    assert widget(browser, node, "motion_guide_scale")["value"] == pytest.approx(3.5)
    click(browser, widget(browser, node, "motion_guide_scale")["right"])
    assert widget(browser, node, "motion_guide_scale")["value"] == pytest.approx(3.6)
    type_value(browser, node, "motion_guide_scale", "5.5")
    assert widget(browser, node, "motion_guide_scale")["value"] == pytest.approx(5.5)
    image = _upload(comfy_server, input_image)
    *shown, text = _queue_and_read_errors(browser, f"w('LoadImage', 'image').value = {json.dumps(image)};"
                                                   f" w('{node}', 'sample_steps').value = 2;"
                                                   f" w('{node}', 'motion_steps').value = 3")
    want = "motion_steps: runs the first steps without LoRAs: at most sample_steps (2), got 3"
    assert shown == [("motion_steps", f"motion_steps - {want}")], shown
    assert text.count("at most sample_steps") == 1, f"the editor shows the problem more than once or not at all: {text}"


def test_the_loaders_layout_inputs_step_and_toggle_and_a_layout_that_cannot_run_is_shown_under_its_input(
        sampler_in_view, browser, comfy_server, input_image):
    """The loader's several-GPU inputs (docs/multigpu.md): ulysses_size by its arrows and by typing, dit_fsdp by a
    click; a layout the model cannot take (ulysses_size 3 on 40 heads), queued from the editor, is shown once, under
    ulysses_size, with the values that would work."""
    node = "Wan22ModelLoader"
    bring_into_view(browser, node)
    assert widget(browser, node, "ulysses_size")["value"] == 1
    click(browser, widget(browser, node, "ulysses_size")["right"])
    assert widget(browser, node, "ulysses_size")["value"] == 2
    type_value(browser, node, "ulysses_size", "8")
    assert widget(browser, node, "ulysses_size")["value"] == 8
    assert widget(browser, node, "dit_fsdp")["value"] is False
    click(browser, widget(browser, node, "dit_fsdp")["middle"])
    assert widget(browser, node, "dit_fsdp")["value"] is True
    type_value(browser, node, "ulysses_size", "3")
    *shown, text = _queue_and_read_errors(browser, f"w('LoadImage', 'image').value = {json.dumps(_upload(comfy_server, input_image))}")
    assert shown == [("ulysses_size", "ulysses_size - ulysses_size: must divide the model's 40 attention heads "
                                      "(1, 2, 4, 5, 8, 10, 20, 40), got 3")], shown
    assert text.count("must divide") == 1, text
    assert not browser.page_errors(), browser.page_errors()
