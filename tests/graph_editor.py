"""Driving the graph editor in headless Chromium (Debian ``chromium``) over the Chrome DevTools Protocol with
``websocket-client`` (no browser-automation package): the CDP client, the page-side readers of the live graph and
widget geometry, and the user's actions (clicking a widget's arrows, typing a value). The ``chromium_bin`` and
``browser`` fixtures (tests/conftest.py) start one Chromium per test module.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import pytest

VIEWPORT = (1920, 1080)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDP:
    """A minimal Chrome DevTools Protocol client over one page target's websocket."""

    def __init__(self, ws_url: str, timeout: float = 30.0):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, *, wait: float = 30.0, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"CDP {method}: no answer in {wait}s")

    def evaluate(self, expression: str, timeout: float = 30.0):
        """Evaluate JS in the page (promises awaited) and return its value (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", wait=timeout + 5, expression=expression, awaitPromise=True,
                           returnByValue=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"JS exception: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression, timeout=10)
            except RuntimeError as exc:  # page still loading
                last = str(exc)
            if last is True:
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")

    def page_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        return errors

    def take_page_errors(self) -> list[str]:
        """The page errors so far, forgotten afterwards (page_errors() then reports only later ones)."""
        errors = self.page_errors()
        self.events = [e for e in self.events if e["method"] != "Runtime.exceptionThrown"]
        return errors

    def settle(self, seconds: float = 1.0):
        """Let the page finish what it does after startup (both frontends restore a workflow asynchronously)."""
        self.evaluate(f"new Promise(r => setTimeout(() => r(true), {int(seconds * 1000)}))", timeout=seconds + 10)

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


# Everything the assertions need, read back from the live graph after loadGraphData.
# Dialogs: the legacy app.ui.dialog (2024 frontend) and the Vue frontend's role="dialog" elements (newer servers).
READ_GRAPH_JS = """
(() => {
  const shown = el => !!el && getComputedStyle(el).display !== 'none' && el.getBoundingClientRect().width > 0;
  const dialogs = [app.ui.dialog.element, ...document.querySelectorAll('[role="dialog"], [role="alertdialog"]')]
    .filter(shown);
  const missing = document.querySelector('.comfy-missing-nodes');
  return {
    nodes: app.graph._nodes.map(n => ({
      id: n.id, type: n.type, title: n.title,
      registered: n.type in LiteGraph.registered_node_types,
      has_errors: !!n.has_errors,
      widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
      widgets_values: n.serialize().widgets_values || [],
      inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link, widget: !!i.widget})),
    })),
    links: Object.values(app.graph.links || {}).filter(Boolean).map(l =>
      [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]),
    missing_dialog: missing ? missing.innerText : null,
    dialog_visible: dialogs.length > 0,
    dialog_text: dialogs.map(d => d.innerText).join('\\n---\\n') || null,
  };
})()
"""


# Widget geometry of one node in page (CSS) pixels: the canvas' client rect plus graph -> canvas offset and scale.
WIDGET_POINTS_JS = """
((nodeType, name) => {
  const node = app.graph._nodes.find(n => n.type === nodeType);
  const w = node.widgets.find(w => w.name === name);
  const H = LiteGraph.NODE_WIDGET_HEIGHT || 20;
  const y = (w.last_y ?? w.y) + H / 2;
  const rect = app.canvas.canvas.getBoundingClientRect();
  const toPage = (gx, gy) => { const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
                               return [rect.left + cx, rect.top + cy]; };
  const [x0, y0] = node.pos;
  const width = node.size[0];
  return {left: toPage(x0 + 18, y0 + y), right: toPage(x0 + width - 18, y0 + y), middle: toPage(x0 + width / 2, y0 + y),
          value: w.value, options: {min: w.options.min, max: w.options.max, step: w.options.step}};
})
"""


def click(browser, point, hold: float = 0.05):
    x, y = point
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    browser.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
    time.sleep(hold)
    browser.call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", buttons=0, clickCount=1)
    time.sleep(0.4)  # two clicks further apart than a double click


def widget(browser, node_type: str, name: str) -> dict:
    return browser.evaluate(f"{WIDGET_POINTS_JS}({json.dumps(node_type)}, {json.dumps(name)})")


def type_value(browser, node_type: str, name: str, text: str):
    """Click the middle of a number widget (LiteGraph opens its "Value" prompt), replace the text, press Enter."""
    click(browser, widget(browser, node_type, name)["middle"])
    browser.wait_for("(() => { const i = document.querySelector('.graphdialog input'); return !!i; })()",
                     timeout=10, what=f"the value prompt of {name}")
    browser.evaluate("(() => { const i = document.querySelector('.graphdialog input'); i.focus(); i.select();"
                     " return true; })()")
    browser.call("Input.insertText", text=text)
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                     nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))
    time.sleep(0.3)


def bring_into_view(browser, node_type: str):
    browser.evaluate(
        f"(() => {{ const n = app.graph._nodes.find(n => n.type === {json.dumps(node_type)});"
        " app.canvas.ds.offset = [200 - n.pos[0], 150 - n.pos[1]];"
        " app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);"
        " return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true)))); })()")


def open_editor(browser: CDP, comfy_server, workflow: dict) -> dict:
    """Open the server's page in Chromium, load ``workflow`` (UI format) and return the graph as read back."""
    if not comfy_server.alive():
        pytest.fail("the shared ComfyUI server died; log tail:\n" + comfy_server.log_tail())
    # A returning user whose last workflow was ours: both frontends restore localStorage["workflow"] at startup, so
    # the newer one skips its first-run "Get Started with a Template" dialog (which would cover the screenshot).
    browser.call("Page.addScriptToEvaluateOnNewDocument",
                 source=f"try {{ localStorage.setItem('workflow', {json.dumps(json.dumps(workflow))}); }} catch (e) {{}}")
    browser.call("Page.navigate", url=comfy_server.url + "/")
    browser.wait_for(
        "typeof window.app !== 'undefined' && !!window.app.graph && !!window.app.canvas"
        " && typeof LiteGraph !== 'undefined' && 'Wan22ImageToVideo' in LiteGraph.registered_node_types",
        timeout=60, what="ComfyUI's app with the Wan2.2 nodes registered",
    )
    browser.settle()
    # Errors thrown while the frontend itself starts up, before our workflow is loaded (the 1.27 frontend's
    # settings store throws one on every fresh page), are the frontend's own unless they name our nodes.
    startup_errors = browser.take_page_errors()
    ours = [e for e in startup_errors if "Wan22" in e or "wan22" in e]
    assert not ours, f"page errors naming the Wan2.2 nodes while the app started: {ours}"
    browser.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)", timeout=30)
    # A fixed view of the whole graph, then a redraw, for the screenshot.
    browser.evaluate(
        "(() => { app.canvas.ds.scale = 1; app.canvas.ds.offset = [20, 40];"
        " app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);"
        " return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true)))); })()"
    )
    return browser.evaluate(READ_GRAPH_JS)


def load_workflow(browser: CDP, workflow: dict, settle: float = 1.0) -> dict:
    """Load another workflow into the open editor; returns the graph as read back."""
    browser.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)", timeout=30)
    browser.settle(settle)
    return browser.evaluate(READ_GRAPH_JS)
