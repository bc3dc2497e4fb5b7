"""The MP4 shown under Wan22SaveVideo in the graph editor, on both frontends: headless Chromium opens the real
ComfyUI server's page, loads the shipped UI workflow, sets a tiny run (96*64, 5 frames, 2 steps) as a user would and
queues it from the editor; then exactly one <video> plays the saved file inside the node's box, and queueing again
replaces it. The 2024 frontend loads every output into an <img> and drew nothing for the MP4 until
web/wan22_video_preview.js; the newer one plays it in its own "video-preview" widget (and the pack adds none).

Debian's chromium decodes H.264; where a Chromium cannot (canPlayType empty), the element, its URL, the bytes that
URL serves (an MP4: an ``ftyp`` box) and its place in the node are still checked, not its frames.
"""
from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.parse
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

import comfy_fixture as cf
from graph_editor import bring_into_view, open_editor, type_value, widget

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

UI_WORKFLOW = cf.REPO_ROOT / "workflows" / "ui" / "wan22_i2v_a14b.json"
SAMPLER, SAVER = "Wan22ImageToVideo", "Wan22SaveVideo"
WIDTH, HEIGHT = 96, 64
H264 = 'video/mp4; codecs="avc1.42E01E"'

# Every <video> in the page, with its box, and the save node's box (page pixels) and preview state.
READ_PREVIEW_JS = """
(() => {
  const node = app.graph._nodes.find(n => n.type === %s);
  const rect = app.canvas.canvas.getBoundingClientRect();
  const toPage = (gx, gy) => { const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
                               return [rect.left + cx, rect.top + cy]; };
  const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
  const box = node ? [...toPage(node.pos[0], node.pos[1] - title),
                      ...toPage(node.pos[0] + node.size[0], node.pos[1] + node.size[1])] : null;
  const videos = [...document.querySelectorAll('video')].map(v => {
    const r = v.getBoundingClientRect();
    return {src: v.currentSrc || v.src, box: [r.left, r.top, r.right, r.bottom],
            shown: !v.hidden && !v.closest('[hidden]') && getComputedStyle(v).display !== 'none' && r.width > 0,
            in_node: !!node && (node.widgets || []).some(w => w.element && w.element.contains(v)),
            autoplay: v.autoplay, loop: v.loop, muted: v.muted, controls: v.controls,
            ready_state: v.readyState, video_width: v.videoWidth, video_height: v.videoHeight,
            error: v.error ? v.error.code : null, can_play_h264: v.canPlayType(%s)};
  });
  return {node_box: box, videos, widgets: node ? (node.widgets || []).map(w => w.name) : null,
          video_container: !!(node && node.videoContainer), imgs: node && node.imgs ? node.imgs.length : null};
})()
""" % (json.dumps(SAVER), json.dumps(H264))

# The bytes the preview's URL serves, fetched by the page as the <video> would (same origin, same cookies).
FETCH_HEAD_JS = """
(async (url) => {
  const r = await fetch(url);
  const b = new Uint8Array(await r.arrayBuffer());
  return {status: r.status, type: r.headers.get('content-type'), size: b.length,
          box: String.fromCharCode(...b.slice(4, 8))};
})
"""


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def editor(browser, comfy_server, input_image):
    """The shipped UI workflow in the editor, its image uploaded and picked, size 96*64, 5 frames, 2 steps typed."""
    from headless.client import ComfyClient

    client = ComfyClient(comfy_server.url)
    try:
        image = client.upload_image(input_image, name="wan22_preview_test.png")
    finally:
        client.close()
    workflow = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
    open_editor(browser, comfy_server, workflow)
    browser.evaluate("(() => { const w = (t, n) => app.graph._nodes.find(x => x.type === t).widgets.find(x => x.name === n);"
                     f" w('LoadImage', 'image').value = {json.dumps(image)}; w('{SAMPLER}', 'size').value = '{WIDTH}*{HEIGHT}';"
                     " return true; })()")
    bring_into_view(browser, SAMPLER)
    type_value(browser, SAMPLER, "frame_num", "5")
    type_value(browser, SAMPLER, "sample_steps", "2")
    assert (widget(browser, SAMPLER, "frame_num")["value"], widget(browser, SAMPLER, "sample_steps")["value"]) == (5, 2)
    return browser


def _queue_and_wait(browser, comfy_server, seed: str) -> dict:
    """Type the seed, queue from the editor as its Queue button does, wait for the run; the saved file's entry."""
    from headless.client import ComfyClient

    bring_into_view(browser, SAMPLER)
    type_value(browser, SAMPLER, "seed", seed)
    assert str(widget(browser, SAMPLER, "seed")["value"]) == seed
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
    client = ComfyClient(comfy_server.url)
    try:
        entry = client.wait(new.pop(), timeout=300)
    finally:
        client.close()
    saver_id = str(browser.evaluate(f"app.graph._nodes.find(n => n.type === {json.dumps(SAVER)}).id"))
    [saved] = entry["outputs"][saver_id]["images"]
    assert saved["filename"].endswith(".mp4") and saved["format"] == "video/h264-mp4", saved
    bring_into_view(browser, SAVER)
    return saved


def _wait_for_preview(browser, saved: dict, timeout: float = 30) -> dict:
    """Wait until a <video> in the page plays ``saved`` and has loaded as far as this Chromium can; the page's state."""
    name = json.dumps("filename=" + urllib.parse.quote(saved["filename"]))
    browser.wait_for(f"[...document.querySelectorAll('video')].some(v => (v.currentSrc || v.src).includes({name}))",
                     timeout=timeout, what=f"a <video> of {saved['filename']}")
    # frames decoded (or the codec refused) before the sizes are read
    browser.wait_for(f"(() => {{ const v = [...document.querySelectorAll('video')].find(v => (v.currentSrc || v.src)"
                     f".includes({name})); return !v.canPlayType({json.dumps(H264)}) || v.readyState >= 2 || !!v.error; }})()",
                     timeout=timeout, what="the <video> to load its first frame")
    bring_into_view(browser, SAVER)  # a redraw: the DOM widget follows the node's (possibly grown) size
    browser.settle(0.5)
    return browser.evaluate(READ_PREVIEW_JS)


def _check_preview(browser, state: dict, saved: dict) -> dict:
    assert len(state["videos"]) == 1, f"expected one <video> for the one save node, got {state['videos']}"
    [video] = state["videos"]
    assert video["in_node"], f"the <video> is not in a widget of {SAVER}: widgets {state['widgets']}"
    assert video["shown"], video
    query = parse_qs(urlsplit(video["src"]).query)
    assert urlsplit(video["src"]).path.endswith("/view"), video["src"]
    assert query["filename"] == [saved["filename"]] and query["type"] == ["output"], video["src"]
    assert query.get("subfolder", [""]) == [saved["subfolder"]], video["src"]
    # inside the node's box (a pixel of rounding allowed)
    left, top, right, bottom = state["node_box"]
    vl, vt, vr, vb = video["box"]
    assert left - 1 <= vl < vr <= right + 1 and top - 1 <= vt < vb <= bottom + 1, (video["box"], state["node_box"])
    served = browser.evaluate(f"{FETCH_HEAD_JS}({json.dumps(video['src'])})")
    assert served["status"] == 200 and served["box"] == "ftyp", served
    assert served["size"] > 1000, served
    if video["can_play_h264"]:
        assert video["error"] is None and video["ready_state"] >= 2, video
        assert (video["video_width"], video["video_height"]) == (WIDTH, HEIGHT), video
    return video


def test_the_saved_mp4_plays_under_the_node_and_a_new_run_replaces_it(editor, comfy_server, tmp_path):
    browser = editor
    browser.take_page_errors()
    first = _queue_and_wait(browser, comfy_server, "1")
    state = _wait_for_preview(browser, first)
    video = _check_preview(browser, state, first)
    ours = "wan22_video_preview" in state["widgets"]
    if not ours:  # the newer frontend: its own player, the pack's extension stays out
        assert "video-preview" in state["widgets"] and state["video_container"], state
    else:  # the 2024 frontend: the pack's player, as the brief of web/wan22_video_preview.js says
        assert (video["autoplay"], video["loop"], video["muted"], video["controls"]) == (True,) * 4, video
        vl, vt, vr, vb = video["box"]
        assert (vr - vl) / (vb - vt) == pytest.approx(WIDTH / HEIGHT, rel=0.03), video["box"]
        assert not state["imgs"], "the MP4 was also loaded as an image preview"
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=900, y=700)  # no tooltip over the screenshot
    browser.settle(0.3)
    data = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "graph_editor_preview.png").write_bytes(data)
    cf.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "graph_editor_preview.png", cf.ARTIFACTS / "graph_editor_preview.png")

    second = _queue_and_wait(browser, comfy_server, "2")
    assert second["filename"] != first["filename"]
    state = _wait_for_preview(browser, second)
    _check_preview(browser, state, second)
    assert ("wan22_video_preview" in state["widgets"]) == ours
    assert state["widgets"].count("wan22_video_preview") + state["widgets"].count("video-preview") == 1, state
    errors = [e for e in browser.page_errors() if "wan22" in e.lower()]
    assert not errors, errors


def test_removing_the_node_removes_its_preview(editor):
    browser = editor
    state = browser.evaluate(READ_PREVIEW_JS)
    if not state["videos"]:
        pytest.skip("no preview left by the previous test")
    browser.evaluate(f"(() => {{ app.graph.remove(app.graph._nodes.find(n => n.type === {json.dumps(SAVER)}));"
                     " app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); return true; })()")
    browser.settle(0.5)
    left = browser.evaluate("[...document.querySelectorAll('video')].map(v => v.src)")
    assert left == [], f"the preview outlived its node: {left}"
