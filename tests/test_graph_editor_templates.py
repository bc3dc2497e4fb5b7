"""The template browser of ComfyUI's Vue frontend (0.3.64: frontend 1.27) as a user meets it: headless Chromium
opens the editor, clicks the sidebar's Templates button, clicks the pack's category and finds one card per shipped
workflow with its title and description (web/wan22_templates.json, handed over by web/wan22_templates.js: the
frontend itself shows a pack's file names) and its thumbnail example_workflows/<name>.jpg, fetched from the pack's
/api/workflow_templates/ route and drawn; clicking a card loads that workflow into the graph.

The pinned 2024 ComfyUI has no template browser (no /workflow_templates route, no Vue frontend): the tests skip,
saying so. The shared Chromium driver is tests/graph_editor.py; a screenshot of the open category is copied to
tests/_artifacts/template_browser.png.
"""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

import comfy_fixture as cf
from graph_editor import READ_GRAPH_JS, click, open_editor

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
CATEGORY = json.loads((REPO / "web" / "wan22_templates.json").read_text(encoding="utf-8"))[0]
CARDS = {card["name"]: card for card in CATEGORY["templates"]}
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))

# Each card of the open category: title, description, the thumbnail's <img> (alt, loaded, size, src) and where it is.
READ_CARDS_JS = """
(() => [...document.querySelectorAll('[data-testid="template-workflows-content"] [data-testid^="template-workflow-"]')]
  .map(card => {
    const img = card.querySelector('img');
    const r = card.getBoundingClientRect();
    return {
      name: card.dataset.testid.replace('template-workflow-', ''),
      title: card.querySelector('h3')?.innerText ?? null,
      description: card.querySelector('p')?.innerText ?? null,
      img: img ? {alt: img.alt, src: img.src, complete: img.complete, width: img.naturalWidth,
                  height: img.naturalHeight, shown: getComputedStyle(img).display !== 'none'} : null,
      center: [r.left + r.width / 2, r.top + r.height / 2],
    };
  }))()
"""

# The title above the cards of the category the dialog shows (null before it shows one); the side list's group
# headers are h2 too.
OPEN_CATEGORY_JS = """
[...document.querySelectorAll('[data-testid="template-workflows-content"] h2')]
  .filter(h => !h.closest('[role="listbox"]')).map(h => h.innerText.trim())[0] ?? null
"""


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def pack(comfy_server) -> str:
    """The folder name the server lists this pack's templates under (skips where there is no template route)."""
    sources = (cf.comfyui_dir() / "server.py").read_text(encoding="utf-8", errors="replace")
    manager = cf.comfyui_dir() / "app" / "custom_node_manager.py"
    if manager.is_file():
        sources += manager.read_text(encoding="utf-8", errors="replace")
    if "workflow_templates" not in sources:
        pytest.skip(f"this ComfyUI ({cf.comfyui_dir()}) has no template browser: no workflow_templates route and no "
                    "Vue frontend (both came after March 2024); its users drag a file from example_workflows/")
    listing = _get_json(comfy_server.url + "/api/workflow_templates")
    packs = [name for name, templates in listing.items() if set(NAMES) <= set(templates)]
    assert len(packs) == 1, f"the pack's templates in the server's listing: {listing}"
    return packs[0]


@pytest.fixture(scope="module")
def editor(pack, browser, comfy_server):
    """The editor with the plain shipped workflow; the frontend's fetches are recorded from here on."""
    workflow = json.loads((EXAMPLES / "wan22_i2v_a14b.json").read_text(encoding="utf-8"))
    open_editor(browser, comfy_server, workflow)
    browser.evaluate("performance.setResourceTimingBufferSize(5000) || true")
    return browser


def _center(browser, selector_js: str, what: str):
    """Scroll the element that ``selector_js`` (an expression) finds into view; its centre in page pixels, once it
    stays put (a list may scroll smoothly)."""
    last = None
    for _ in range(40):
        point = browser.evaluate(
            f"(() => {{ const el = {selector_js}; if (!el) return null;"
            " el.scrollIntoView({block: 'center', inline: 'center', behavior: 'instant'});"
            " return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => {"
            " const b = el.getBoundingClientRect(); r([b.left + b.width / 2, b.top + b.height / 2]); }))); })()")
        assert point, f"no {what} on the page"
        if point == last:
            return point
        last = point
        time.sleep(0.1)
    raise AssertionError(f"the {what} keeps moving ({last})")


def open_category(browser) -> list:
    """Click the sidebar's Templates button, then the pack's category in the dialog; return its cards as read."""
    browser.evaluate("(() => { document.querySelectorAll('[role=\"dialog\"] .p-dialog-close-button')"
                     ".forEach(b => b.click()); return true; })()")  # a first-run dialog, if the profile had one
    browser.wait_for("!document.querySelector('[data-testid=\"template-workflows-content\"]')", 10, "no dialog open")
    click(browser, _center(browser, "document.querySelector('.templates-tab-button')", "sidebar Templates button"))
    browser.wait_for("!!document.querySelector('[data-testid=\"template-workflows-content\"] [role=\"option\"]')", 20,
                     "the template browser with its categories")
    # the dialog opens its first category once the templates are loaded: only then is a click of ours kept
    browser.wait_for(f"({OPEN_CATEGORY_JS}) !== null", 30, "the template browser to open its first category")
    options = browser.evaluate("[...document.querySelectorAll('[data-testid=\"template-workflows-content\"]"
                               " [role=\"option\"]')].map(o => o.innerText.trim())")
    assert options.count(CATEGORY["title"]) == 1, f"the pack's category {CATEGORY['title']!r} among {options}"
    click(browser, _center(browser, "[...document.querySelectorAll('[data-testid=\"template-workflows-content\"]"
                                    f" [role=\"option\"]')].find(o => o.innerText.trim() === {json.dumps(CATEGORY['title'])})",
                           "option of the pack's category"))
    browser.wait_for(f"({OPEN_CATEGORY_JS}) === {json.dumps(CATEGORY['title'])}", 10,
                     "the pack's category opened (its title above the cards)")
    browser.wait_for(f"({READ_CARDS_JS}).filter(c => c.img && c.img.complete && c.img.width > 0).length"
                     f" === {len(NAMES)}", 30, "every card with its thumbnail drawn")
    return browser.evaluate(READ_CARDS_JS)


def test_cards_show_title_description_and_thumbnail(editor, comfy_server, pack, tmp_path):
    browser = editor
    cards = open_category(browser)
    options = browser.evaluate("[...document.querySelectorAll('[data-testid=\"template-workflows-content\"]"
                               " [role=\"option\"]')].map(o => o.innerText.trim())")
    # the pack is listed once, under its name, not again under its folder with file names
    assert pack not in options, options
    data = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "template_browser.png").write_bytes(data)
    cf.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "template_browser.png", cf.ARTIFACTS / "template_browser.png")

    assert sorted(c["name"] for c in cards) == NAMES
    fetched = browser.evaluate("performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus ?? null])")
    for card in cards:
        name, meta = card["name"], CARDS[card["name"]]
        assert card["title"] == meta["title"] and card["title"] != name, card
        assert card["description"] == meta["description"] and name not in card["description"], card
        img = card["img"]
        assert img and img["shown"] and img["complete"] and (img["width"], img["height"]) == (400, 400), card
        assert img["alt"] == meta["title"]
        # drawn from our file, fetched from the pack's route (the frontend shows it as a blob: copy)
        url = f"{comfy_server.url}/api/workflow_templates/{pack}/{name}.jpg"
        assert [url, 200] in fetched or [url, None] in fetched, f"{url} not fetched: {fetched}"
        shown = browser.evaluate(f"fetch({json.dumps(img['src'])}).then(r => r.arrayBuffer())"
                                 ".then(b => crypto.subtle.digest('SHA-256', b))"
                                 ".then(d => [...new Uint8Array(d)].map(x => x.toString(16).padStart(2, '0')).join(''))")
        assert shown == hashlib.sha256((EXAMPLES / f"{name}.jpg").read_bytes()).hexdigest(), name
    ours = [e for e in browser.page_errors() if "wan22" in e.lower()]
    assert not ours, ours


@pytest.mark.parametrize("name", NAMES)
def test_clicking_a_card_loads_its_workflow(editor, name):
    browser = editor
    browser.evaluate("app.graph.clear() || true")  # so that what the click loads is seen arriving
    open_category(browser)
    expected = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
    # five cards make two rows: the second is below the dialog's fold until scrolled to, as a user would
    selector = f"document.querySelector('[data-testid=\"template-workflow-{name}\"]')"
    click(browser, _center(browser, selector, f"card {name}"))
    browser.wait_for("!document.querySelector('[data-testid=\"template-workflows-content\"]')", 20,
                     "the template browser to close after the click")
    want = sorted(n["type"] for n in expected["nodes"])
    deadline = time.monotonic() + 20
    graph = browser.evaluate(READ_GRAPH_JS)
    while sorted(n["type"] for n in graph["nodes"]) != want and time.monotonic() < deadline:
        time.sleep(0.25)
        graph = browser.evaluate(READ_GRAPH_JS)
    assert sorted(n["type"] for n in graph["nodes"]) == want, name
    assert sorted(map(tuple, graph["links"])) == sorted(map(tuple, expected["links"]))
    by_id = {n["id"]: n for n in graph["nodes"]}
    for node in expected["nodes"]:
        assert by_id[node["id"]]["widgets_values"] == node["widgets_values"], (name, node["type"])
    assert all(n["registered"] and not n["has_errors"] for n in graph["nodes"])
    assert graph["missing_dialog"] is None and not graph["dialog_visible"], graph["dialog_text"]
