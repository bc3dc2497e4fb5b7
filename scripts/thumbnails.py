"""Thumbnails of the shipped workflows for ComfyUI's template browser: example_workflows/<name>.jpg, the file the
Vue frontend requests for a custom node pack's template (ComfyUI's own templates are 400x400 too).

Each one is the real graph editor's picture of that workflow: ComfyUI 0.3.64 (.comfyui-current, run by
.venv-comfyui-current, with its own throwaway user folder) with this checkout as its node pack and the tiny models of
`make ui`, headless Chromium at 1600x1600 in focus mode with the minimap, the canvas buttons and the canvas info
hidden, the graph fitted and centred (a graph too wide for that shown from its left edge), downscaled to a square
JPEG whose comment names the layout it shows (drawn_from). Run it again after the layout of the workflows changes
(python -m scripts.regenerate): the tests only check the files (tests/test_packaging.py: size, format, a graph
drawn, that layout), never render them.

    .venv/bin/python -m scripts.thumbnails [--size 400] [--quality 85] [--keep-png DIR]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scripts.regenerate import WORKFLOWS  # noqa: E402

VIEW = 1600  # CSS pixels of the square page the graph is drawn in, before downscaling
MIN_SCALE = 0.7  # below it, widgets are unreadable at 400 px
# what the editor draws over the canvas besides the graph and its DOM widgets (the prompt's text boxes)
HIDE_CSS = (".comfy-menu-hamburger, .minimap-main-container, .graph-canvas-panel .p-buttongroup,"
            " .p-toast { display: none !important; }")

# Fit every node (with its title bar and the source badge above it) into the square page, centred, never above
# scale 1 nor below MIN_SCALE, and draw it. A graph too wide for MIN_SCALE (the 4-step one's LoRA chain) is drawn
# from its left edge, where it is read from, rather than shrunk to a thin, unreadable strip.
FIT_JS = """
((view, margin, minScale) => {
  const title = LiteGraph.NODE_TITLE_HEIGHT || 30, badge = 24;
  const boxes = app.graph._nodes.map(n => [n.pos[0], n.pos[1] - title - badge, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
  const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
  const x1 = Math.max(...boxes.map(b => b[2])), y1 = Math.max(...boxes.map(b => b[3]));
  const scale = Math.min(1, (view - 2 * margin) / (y1 - y0), Math.max(minScale, (view - 2 * margin) / (x1 - x0)));
  const fits = (x1 - x0) * scale <= view - 2 * margin;
  app.canvas.show_info = false;
  app.canvas.deselectAll?.();
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [fits ? view / (2 * scale) - (x0 + x1) / 2 : margin / scale - x0,
                          view / (2 * scale) - (y0 + y1) / 2];
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(scale))));
})
"""


def drawn_from(workflow: dict) -> str:
    """What a thumbnail shows of a workflow, as a JPEG comment: a digest of its nodes' places, sizes, types and titles
    and its links (not the widget values, unreadable at 400 px). tests/test_packaging.py compares it with the
    shipped file, so a thumbnail left behind by a layout change fails there."""
    nodes = sorted([n["id"], n["type"], n.get("title"), list(n["pos"]), list(n["size"])] for n in workflow["nodes"])
    digest = hashlib.sha256(json.dumps([nodes, sorted(workflow["links"])]).encode()).hexdigest()[:16]
    return f"wan22 graph {digest}"


def launch_chromium(profile: Path, log):
    """Headless Chromium with a DevTools port on a square page; returns (process, CDP client)."""
    from graph_editor import CDP, CHROMIUM_FLAGS, find_chromium

    binary = find_chromium()
    if binary is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--window-size={VIEW},{VIEW}", "--remote-debugging-port=0",
                             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 45
    while not (port_file.is_file() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"chromium did not open its DevTools port (rc={proc.poll()})")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        page = next(t for t in json.load(resp) if t.get("type") == "page")
    cdp = CDP(page["webSocketDebuggerUrl"])
    cdp.call("Page.enable")
    cdp.call("Runtime.enable")
    cdp.call("Emulation.setDeviceMetricsOverride", width=VIEW, height=VIEW, deviceScaleFactor=1, mobile=False)
    return proc, cdp


def open_page(cdp, url: str, workflow: dict) -> None:
    """The editor with `workflow` restored at startup (no first-run dialog), in focus mode, overlays hidden."""
    cdp.call("Page.addScriptToEvaluateOnNewDocument",
             source=f"try {{ localStorage.setItem('workflow', {json.dumps(json.dumps(workflow))}); }} catch (e) {{}}")
    cdp.call("Page.navigate", url=url + "/")
    cdp.wait_for("typeof window.app !== 'undefined' && !!window.app.graph && !!window.app.canvas"
                 " && typeof LiteGraph !== 'undefined' && 'Wan22ImageToVideo' in LiteGraph.registered_node_types",
                 timeout=90, what="ComfyUI's app with the Wan2.2 nodes registered")
    cdp.settle(2)
    cdp.evaluate("(async () => { await app.extensionManager.command.execute('Workspace.ToggleFocusMode');"
                 f" const s = document.createElement('style'); s.textContent = {json.dumps(HIDE_CSS)};"
                 " document.head.appendChild(s); return true; })()")


def render(cdp, workflow: dict):
    """The editor's picture of `workflow` (a PIL image, VIEW x VIEW)."""
    from PIL import Image

    cdp.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)", timeout=30)
    cdp.settle(1.5)  # DOM widgets (the prompt boxes) follow the canvas on the next frames
    cdp.evaluate(f"{FIT_JS}({VIEW}, 40, {MIN_SCALE})")
    cdp.settle(1.0)
    data = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
    return Image.open(io.BytesIO(data)).convert("RGB")


def thumbnail(image, size: int, quality: int, comment: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    image.resize((size, size), Image.LANCZOS).save(out, "JPEG", quality=quality, optimize=True, progressive=True,
                                                   comment=comment)
    return out.getvalue()


def main(argv=None) -> int:
    from headless.server import ServerStartError, start_comfyui
    from scripts.ui import CURRENT, pick_models

    ap = argparse.ArgumentParser(prog="python -m scripts.thumbnails", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=400, help="side of the square JPEG (default 400)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    ap.add_argument("--keep-png", metavar="DIR", help="also save the full-size screenshots there")
    args = ap.parse_args(argv)

    comfyui, python, which = CURRENT
    if not (comfyui / "main.py").is_file() or not python.is_file():
        print(f"no {which} in {comfyui}: run `make setup` first", file=sys.stderr)
        return 1
    models, _ = pick_models(None)
    work = Path(tempfile.mkdtemp(prefix="wan22-thumbnails-"))
    server = proc = cdp = None
    try:
        (work / "user").mkdir()
        # its own user folder: the editor's settings are written there, not into .comfyui-current/user
        server = start_comfyui(comfyui, models_dir=models, python=str(python), cpu=True, work_dir=work,
                               extra_args=["--user-directory", str(work / "user")])
        with open(work / "chromium.log", "wb") as log:
            proc, cdp = launch_chromium(work / "profile", log)
            first = json.loads((REPO / "example_workflows" / next(iter(WORKFLOWS.values()))).read_text(encoding="utf-8"))
            open_page(cdp, server.url, first)
            for name in WORKFLOWS.values():
                workflow = json.loads((REPO / "example_workflows" / name).read_text(encoding="utf-8"))
                image = render(cdp, workflow)
                if args.keep_png:
                    Path(args.keep_png).mkdir(parents=True, exist_ok=True)
                    image.save(Path(args.keep_png) / name.replace(".json", ".png"))
                target = REPO / "example_workflows" / name.replace(".json", ".jpg")
                target.write_bytes(thumbnail(image, args.size, args.quality, drawn_from(workflow)))
                print(f"{target.relative_to(REPO)}: {args.size}x{args.size}, {target.stat().st_size} bytes")
            errors = [e for e in cdp.page_errors() if "wan22" in e.lower()]
            if errors:
                print(f"page errors naming the Wan2.2 nodes: {errors}", file=sys.stderr)
                return 1
        return 0
    except ServerStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if cdp is not None:
            cdp.close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
