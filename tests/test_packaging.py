"""Packaging: requirements.txt for users who clone into ComfyUI/custom_nodes, the Comfy Registry metadata in
pyproject.toml (checked against the registry's specification and by comfy-cli's own `comfy node validate`),
the archive `comfy node publish` would upload, the node pack's entry point, and the wheel (engine + runner only,
never a top-level ``nodes`` package, which would shadow ComfyUI's own ``nodes`` module).

comfy-cli is pinned in requirements/test.txt (``make setup`` installs it); without it the comfy-cli tests skip,
unless ``WAN22_REQUIRE_COMFYUI=1`` (``make test`` / CI) makes that a failure. No server; the network only to ask
the package indexes whether the pinned versions exist (those tests skip, saying so, when an index is unreachable).
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]
RUNTIME_DEPS = {"diffusers", "transformers", "safetensors", "sentencepiece", "tokenizers", "imageio-ffmpeg", "pillow",
                "numpy", "kornia", "requests", "websocket-client"}
NODE_TYPES = {"Wan22ModelLoader", "Wan22LoraLoader", "Wan22TextEncode", "Wan22PromptExtend", "Wan22ImageToVideo", "Wan22ExtendVideo",
              "Wan22SaveVideo", "Wan22LoadImage"}
# import name -> distribution, for the third-party modules the pack's code imports
IMPORT_TO_DIST = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg", "websocket": "websocket-client"}
# provided by ComfyUI itself (torch, its modules) or optional and guarded by try/except ImportError
# ComfyUI's own modules and what its server runs on (aiohttp: the pack's route is registered only inside ComfyUI)
PROVIDED = {"torch", "comfy", "folder_paths", "server", "aiohttp", "ftfy"}
# never copied into temp trees (big, machine-local, or build output)
SKIP_DIRS = {".git", ".venv", ".comfyui", ".comfyui-current", ".venv-comfyui-current", ".cache", "demo_out", "build",
             "_artifacts", "__pycache__", ".ruff_cache", ".pytest_cache", "node_modules"}


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a pip requirements file, following `-r other.txt`."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(path.parent / line[3:].strip())
        elif line:
            lines.append(line)
    return lines


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def require_comfy_cli():
    try:
        import comfy_cli  # noqa: F401  (only checks that it is installed)
    except ImportError:
        message = "comfy-cli is not installed (it is pinned in requirements/test.txt: run `make setup`)"
        if os.environ.get("WAN22_REQUIRE_COMFYUI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    comfy = Path(sys.executable).parent / "comfy"
    if not comfy.is_file():
        pytest.fail(f"comfy-cli is importable but its `comfy` script is not next to {sys.executable}")
    return comfy


def source_files() -> list[str]:
    """The repository's files as git sees them (tracked + untracked, not ignored), else a filtered walk."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=30).stdout.decode()
        files = [f for f in out.split("\0") if f and ((REPO / f).is_file() or (REPO / f).is_symlink())]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [str((Path(root) / n).relative_to(REPO)) for n in names if not n.endswith(".pyc")]
    return files


def copy_source_tree(dest: Path) -> Path:
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target, follow_symlinks=False)  # headless/workflows stays a link to workflows/api
    return dest


def isolated_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PYTHONDONTWRITEBYTECODE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    env.pop("PYTHONPATH", None)
    return env


# --- requirements.txt and [project].dependencies ------------------------------------------------------------------

def test_requirements_txt_is_runtime_only_with_lower_bounds():
    reqs = [Requirement(line) for line in requirement_lines(REPO / "requirements.txt")]
    names = {normalize(r.name) for r in reqs}
    assert names == RUNTIME_DEPS
    assert not names & {"torch", "torchvision", "torchaudio"}, "ComfyUI brings torch: never reinstall it"
    for req in reqs:
        ops = {spec.operator for spec in req.specifier}
        assert ops == {">="}, f"{req}: only loose lower bounds (>=) for users' ComfyUI environments"
    assert Requirement(next(line for line in requirement_lines(REPO / "requirements.txt")
                            if line.startswith("diffusers"))).specifier.contains("0.35.0")


def test_pyproject_dependencies_mirror_requirements_txt():
    from_file = {normalize(Requirement(line).name): str(Requirement(line).specifier)
                 for line in requirement_lines(REPO / "requirements.txt")}
    from_project = {normalize(Requirement(dep).name): str(Requirement(dep).specifier)
                    for dep in PROJECT["dependencies"]}
    assert from_project == from_file


def _pins(path: Path) -> dict:
    return {normalize(Requirement(line).name): next(iter(Requirement(line).specifier)).version
            for line in requirement_lines(path)}


def test_the_image_installs_the_tested_versions():
    """The RunPod image installs requirements/runtime.txt (which the tests install too) and torch/torchvision at
    requirements/test.txt's versions; nothing in the Dockerfile pins or loosens a runtime package on its own."""
    dockerfile = (REPO / "runpod_worker" / "Dockerfile").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    tested = _pins(REPO / "requirements" / "test.txt")
    assert args["TORCH_VERSION"] == tested["torch"] and args["TORCHVISION_VERSION"] == tested["torchvision"]
    # no torchaudio, as in the environments the tests run ComfyUI in: ComfyUI's unpinned torch family is dropped
    assert "torchaudio" not in tested and not any("TORCHAUDIO" in name for name in args)
    assert "grep -v -x -E '(torch|torchvision|torchaudio)([<>=!~].*)?' /opt/ComfyUI/requirements.txt" in dockerfile
    assert "pip install -r /opt/ComfyUI/requirements.txt" not in dockerfile
    assert args["COMFYUI_REF"] == "v0.3.64"  # the newer ComfyUI the suite runs against
    assert "COPY requirements/runtime.txt" in dockerfile and "pip install -r /tmp/runtime.txt" in dockerfile
    runtime = _pins(REPO / "requirements" / "runtime.txt")
    assert runtime.items() <= tested.items(), "requirements/test.txt must include runtime.txt unchanged"
    assert {"diffusers", "transformers", "runpod", "safetensors"} <= set(runtime)
    loose = re.findall(r'"([A-Za-z0-9_.-]+)(?:[<>=!~]=?)[^"]*"', dockerfile)
    assert not loose, f"the Dockerfile installs packages outside requirements/runtime.txt: {loose}"


# --- every pinned version exists on the index it is installed from ------------------------------------------------

PYPI_SIMPLE = "https://pypi.org/simple"
# ComfyUI's requirements at the image's COMFYUI_REF, where a checkout of that release is here (`make setup`)
COMFYUI_CURRENT_REQUIREMENTS = REPO / ".comfyui-current" / "requirements.txt"


def dockerfile_args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "runpod_worker" / "Dockerfile").read_text(encoding="utf-8"),
                           re.M))


def exact_pins(path: Path) -> dict:
    """name -> version of the `name==version` lines of a requirements file (following -r)."""
    pins = {}
    for line in requirement_lines(path):
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[normalize(req.name)] = specs[0].version
    return pins


def index_get(url: str, **kwargs):
    """GET `url`; skip (saying which index) only when it cannot be reached at all."""
    import requests

    try:
        return requests.get(url, timeout=30, **kwargs)
    except (requests.ConnectionError, requests.Timeout) as exc:
        pytest.skip(f"package index unreachable, pinned versions not checked: {url}: {exc}")


def pypi_versions(name: str) -> set:
    """The versions PyPI serves files for, not counting releases whose files are all yanked (PEP 691/700 JSON)."""
    from packaging.version import Version

    resp = index_get(f"{PYPI_SIMPLE}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    assert resp.status_code == 200, f"{name}: not on PyPI ({resp.status_code} from {resp.url})"
    data = resp.json()
    files = {}
    for f in data["files"]:
        version = _file_version(name, f["filename"])
        if version is not None:
            files.setdefault(version, []).append(not f.get("yanked"))
    listed = {Version(v) for v in data.get("versions", []) if _parses(v)}
    return {v for v in listed if any(files.get(v, [True]))} or {v for v, ok in files.items() if any(ok)}


def _parses(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        Version(version)
        return True
    except InvalidVersion:
        return False


def _file_version(name: str, filename: str):
    """The version in a wheel's or sdist's file name (None when it cannot be read)."""
    from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None


def test_every_pinned_version_exists_on_pypi():
    """requirements/runtime.txt (the image installs it), requirements/test.txt (`make setup`) and ComfyUI's own pins
    at the image's release: each `==` version is on PyPI, not yanked. A version that does not exist fails the image
    build and `make setup`."""
    from packaging.version import Version

    pins = {**exact_pins(REPO / "requirements" / "test.txt"), **exact_pins(REPO / "requirements" / "runtime.txt")}
    assert {"torch", "torchvision", "diffusers", "runpod"} <= set(pins)
    if COMFYUI_CURRENT_REQUIREMENTS.is_file() and dockerfile_args()["COMFYUI_REF"] == "v0.3.64":
        pins.update(exact_pins(COMFYUI_CURRENT_REQUIREMENTS))
    missing = {}
    for name, version in sorted(pins.items()):
        if Version(version) not in pypi_versions(name):
            missing[name] = version
    assert not missing, f"pinned, but PyPI serves no such version: {missing}"


# the image's Python: Ubuntu 24.04's python3 (3.12); the torch wheels must exist for it
IMAGE_PYTHON_TAG = "cp312"


def test_the_images_torch_pins_exist_on_its_torch_index():
    """torch and torchvision as the Dockerfile installs them: TORCH_INDEX_URL's simple page lists a Linux x86_64
    wheel of each pinned version for the image's Python (e.g. torch-2.14.1+cu128-cp312-cp312-manylinux...)."""
    from urllib.parse import unquote

    args = dockerfile_args()
    assert args["CUDA_IMAGE"].endswith("ubuntu24.04"), "IMAGE_PYTHON_TAG assumes Ubuntu 24.04's Python 3.12"
    index = args["TORCH_INDEX_URL"].rstrip("/")
    local = index.rsplit("/", 1)[-1] if "download.pytorch.org" in index else ""  # cu128 -> the +cu128 builds
    pins = {"torch" + name[len("TORCH"):-len("_VERSION")].lower(): version for name, version in args.items()
            if name.startswith("TORCH") and name.endswith("_VERSION")}
    assert set(pins) == {"torch", "torchvision"}, pins
    missing = []
    for name, version in sorted(pins.items()):
        resp = index_get(f"{index}/{name}/")
        assert resp.status_code == 200, f"{name}: {resp.status_code} from {resp.url}"
        want = f"{name}-{version}" + (f"+{local}" if local else "") + f"-{IMAGE_PYTHON_TAG}-{IMAGE_PYTHON_TAG}-"
        wheels = [unquote(w) for w in re.findall(r'[>/]([^/<>"#]+\.whl)', resp.text)]
        if not any(w.startswith(want) and w.endswith(("linux_x86_64.whl",)) for w in wheels):
            missing.append(f"{want}*linux_x86_64.whl")
    assert not missing, f"{index} has no wheel for: {missing}"


def test_pinned_test_requirements_satisfy_the_loose_ones():
    pins = {}
    for line in requirement_lines(REPO / "requirements" / "test.txt"):
        req = Requirement(line)
        pins[normalize(req.name)] = next(iter(req.specifier)).version
    assert "comfy-cli" in pins, "comfy-cli must be pinned in requirements/test.txt"
    for line in requirement_lines(REPO / "requirements.txt"):
        req = Requirement(line)
        assert normalize(req.name) in pins, f"{req.name} is not pinned in requirements/test.txt"
        assert req.specifier.contains(pins[normalize(req.name)]), (req, pins[normalize(req.name)])


def third_party_imports(paths) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    local = {"wan22", "headless", "nodes", "runpod_worker"}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_of_the_pack_is_declared():
    """What ComfyUI imports from this pack (root __init__, nodes/, wan22/) and the runner need only requirements.txt."""
    paths = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py")), *sorted((REPO / "wan22").rglob("*.py")),
             *sorted((REPO / "headless").rglob("*.py"))]
    declared = {normalize(Requirement(line).name) for line in requirement_lines(REPO / "requirements.txt")}
    undeclared = {}
    for top, where in third_party_imports(paths).items():
        if top in PROVIDED:
            continue
        if normalize(IMPORT_TO_DIST.get(top, top)) not in declared:
            undeclared[top] = sorted(where)
    assert not undeclared, f"imported but not in requirements.txt: {undeclared}"
    # ftfy is optional: every import of it must be guarded
    text = (REPO / "wan22" / "runtime" / "text_encoder.py").read_text(encoding="utf-8")
    if "import ftfy" in text:
        assert "except ImportError" in text


# --- the node pack's entry point ----------------------------------------------------------------------------------

def test_root_init_exports_the_node_mappings():
    """ComfyUI imports the repository root as a package and reads NODE_CLASS_MAPPINGS (the live server's
    /object_info is covered by tests/test_nodes_comfy.py); here: the names, read from the source."""
    root = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in root.body if isinstance(node, ast.ImportFrom) and node.level == 1
                and node.module == "nodes" for alias in node.names}
    assert {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"} <= imported
    exported = next(ast.literal_eval(node.value) for node in root.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    assert {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"} <= set(exported)

    pkg = ast.parse((REPO / "nodes" / "__init__.py").read_text(encoding="utf-8"))
    mappings = {}
    for node in pkg.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            mappings[node.targets[0].id] = node.value
    classes = {ast.literal_eval(k): v.id for k, v in zip(mappings["NODE_CLASS_MAPPINGS"].keys,
                                                          mappings["NODE_CLASS_MAPPINGS"].values)}
    assert set(classes) == NODE_TYPES
    names = {ast.literal_eval(k) for k in mappings["NODE_DISPLAY_NAME_MAPPINGS"].keys}
    assert names == NODE_TYPES
    # each class is defined in nodes/ with the classic node API
    defined = {}
    for path in (REPO / "nodes").glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                defined[node.name] = {getattr(t, "id", None) for stmt in node.body if isinstance(stmt, ast.Assign)
                                      for t in stmt.targets} | {stmt.name for stmt in node.body
                                                                if isinstance(stmt, ast.FunctionDef)}
    for type_name, cls in classes.items():
        assert cls in defined, f"{type_name} -> {cls} not defined in nodes/"
        assert {"INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "CATEGORY"} <= defined[cls], (cls, defined[cls])


# --- Comfy Registry metadata --------------------------------------------------------------------------------------

# https://docs.comfy.org/registry/specifications: < 100 chars; alphanumerics, '-', '_', '.'; no consecutive special
# characters; starts with a letter; best practice: no "ComfyUI" in it.
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")


def test_project_metadata_meets_the_registry_specification():
    name = PROJECT["name"]
    assert len(name) < 100 and NODE_ID.match(name), name
    assert "comfyui" not in name.lower(), "registry best practice: no 'ComfyUI' in the node id"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "version must be X.Y.Z"
    assert PROJECT["description"].strip()
    license_value = PROJECT["license"]
    if isinstance(license_value, dict):
        assert license_value.get("text") or (REPO / license_value.get("file", "")).is_file()
    else:
        assert license_value == "Apache-2.0"  # PEP 639 SPDX expression; upstream Wan2.2 is Apache-2.0
    urls = PROJECT["urls"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", urls["Repository"]), urls
    assert all(u.startswith("https://") for u in urls.values())
    assert (REPO / PROJECT["readme"]).is_file()
    assert not any(normalize(Requirement(d).name) == "torch" for d in PROJECT["dependencies"])


def icon_path() -> str:
    """The Icon URL is this repository's main branch on raw.githubusercontent.com: the path inside the repo."""
    repo_path = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo_path}/main/"
    assert COMFY["Icon"].startswith(prefix), COMFY["Icon"]
    return COMFY["Icon"].removeprefix(prefix)


def test_tool_comfy_section():
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip() and "Wan2.2" in COMFY["DisplayName"]
    # the icon file must be in this repository (tracked: see the archive test), a square PNG <= 400 px
    icon = REPO / icon_path()
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width == height and 64 <= width <= 400, (width, height)
    assert isinstance(COMFY["includes"], list)
    for include in COMFY["includes"]:
        assert (REPO / include).exists(), f"includes names a missing path: {include}"
    assert "example_workflows" in COMFY["includes"]


def test_every_template_has_a_card_and_a_thumbnail():
    """What the template browser shows for example_workflows/ (tests/test_graph_editor_templates.py: in the editor):
    every workflow there has its card (title, description) in web/wan22_templates.json and its thumbnail
    <name>.jpg (python -m scripts.thumbnails): a 400x400 JPEG under 100 KB with a picture in it, of the workflow's
    current layout."""
    import json

    from PIL import Image

    from scripts.thumbnails import drawn_from

    names = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert len(names) == 5, names
    index = json.loads((REPO / "web" / "wan22_templates.json").read_text(encoding="utf-8"))
    assert len(index) == 1 and index[0]["title"] == COMFY["DisplayName"], index
    cards = index[0]["templates"]
    assert sorted(c["name"] for c in cards) == names
    for card in cards:
        assert card["title"].strip() and card["title"] != card["name"], card
        assert 20 <= len(card["description"]) <= 50 and not set("-_") & set(card["description"]), card
        assert (card["mediaType"], card["mediaSubtype"]) == ("image", "jpg"), card
    for name in names:
        path = REPO / "example_workflows" / f"{name}.jpg"
        assert path.is_file(), f"no thumbnail {path.name}: run python -m scripts.thumbnails"
        assert path.stat().st_size < 100_000, (path.name, path.stat().st_size)
        with Image.open(path) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", (400, 400), "RGB"), (path.name, img.format, img.size)
            shown = img.info.get("comment", b"").decode()
            histogram = img.convert("L").histogram()
        background = max(range(256), key=histogram.__getitem__)
        drawn = sum(n for value, n in enumerate(histogram) if abs(value - background) > 12) / (400 * 400)
        assert drawn > 0.05, f"{path.name}: {drawn:.1%} differs from the background: no graph drawn?"
        assert sum(histogram[120:]) > 100, f"{path.name}: no light text or links: no graph drawn?"
        workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
        assert shown == drawn_from(workflow), (f"{path.name} shows another layout of {name}.json ({shown!r}): "
                                               "run python -m scripts.thumbnails")
    assert len({(REPO / "example_workflows" / f"{n}.jpg").read_bytes() for n in names}) == len(names)


def test_comfy_cli_reads_the_config_as_specified(capsys):
    require_comfy_cli()
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(REPO / "pyproject.toml"))
    out = capsys.readouterr().out
    assert config is not None
    assert "Warning" not in out and "Error" not in out, out
    assert config.project.name == PROJECT["name"] and config.project.version == PROJECT["version"]
    assert config.project.license.text == "Apache-2.0"
    assert config.project.urls.repository == PROJECT["urls"]["Repository"]
    assert {normalize(Requirement(d).name) for d in config.project.dependencies} == RUNTIME_DEPS
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.tool_comfy.publisher_id == COMFY["PublisherId"]
    assert config.tool_comfy.display_name == COMFY["DisplayName"]
    assert config.tool_comfy.icon == COMFY["Icon"]
    assert config.tool_comfy.includes == COMFY["includes"]


def test_comfy_node_validate_passes(tmp_path):
    """`comfy node validate` (comfy-cli, pinned) in a copy of the repository, with a throwaway HOME."""
    comfy = require_comfy_cli()
    src = copy_source_tree(tmp_path / "src")
    proc = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=src,
                          env=isolated_env(tmp_path), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "All validation checks passed" in output, output
    for bad in ("Warning", "Error", "Security warnings"):
        assert bad not in output, output


def test_registry_archive_holds_the_pack(tmp_path, monkeypatch):
    """The zip `comfy node publish` uploads (comfy-cli's own zip_files: git-tracked files, .comfyignore, includes)."""
    require_comfy_cli()
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the registry archive is built from git-tracked files")
    from comfy_cli.file_utils import zip_files

    archive = tmp_path / "node.zip"
    monkeypatch.chdir(REPO)
    zip_files(str(archive), includes=COMFY["includes"])
    names = set(zipfile.ZipFile(archive).namelist())
    required = ["__init__.py", "pyproject.toml", "requirements.txt", "README.md", "nodes/__init__.py",
                "wan22/__init__.py", "example_workflows/wan22_i2v_a14b.json", icon_path(), "web/wan22_templates.json"]
    required += [str(p.relative_to(REPO)) for p in (REPO / "web").glob("*.js")]  # WEB_DIRECTORY's extensions
    required += [f"example_workflows/{p.stem}.jpg" for p in (REPO / "example_workflows").glob("*.json")]
    required += [str(p.relative_to(REPO)) for p in (REPO / "wan22" / "checkpoints" / "configs").glob("*.json")]
    missing = [name for name in required if name not in names]
    assert not missing, f"not in the registry archive (git-tracked?): {missing}"
    for module in ("nodes", "wan22"):
        tracked = {n for n in names if n.startswith(module + "/") and n.endswith(".py")}
        assert tracked, module
    leaked = [n for n in names if n.split("/")[0] in SKIP_DIRS or "/_artifacts/" in n or n.endswith(".pyc")]
    assert not leaked, leaked
    assert sum(info.file_size for info in zipfile.ZipFile(archive).infolist()) < 20 * 2**20


# --- the wheel: engine + runner, never a top-level `nodes` --------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_source_tree(tmp / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(src)],
                          env=isolated_env(tmp), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_engine_runner_worker_and_no_nodes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"wan22", "headless", "runpod_worker"}, tops
    assert "headless/workflows/wan22_i2v_a14b.json" in names, "the installed runner needs the shipped workflow"
    assert not any(n.startswith("nodes/") or n == "nodes.py" for n in names)
    assert "wan22/checkpoints/configs/wan22_i2v_a14b_transformer.json" in names
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert dist_info.startswith(PROJECT["name"].replace("-", "_") + "-" + PROJECT["version"])
    zf = zipfile.ZipFile(wheel)
    top_level = zf.read(f"{dist_info}/top_level.txt").decode().split() if f"{dist_info}/top_level.txt" in names else []
    assert "nodes" not in top_level
    entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert "wan22-i2v = headless.cli:main" in entry_points
    metadata = zf.read(f"{dist_info}/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = {normalize(Requirement(r).name) for r in requires if Requirement(r).marker is None}
    assert unconditional == RUNTIME_DEPS
    assert "License-Expression: Apache-2.0" in metadata


def test_pip_install_no_deps_installs_no_nodes_package(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q",
                           "--target", str(target), str(wheel)],
                          env=isolated_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert installed == {"wan22", "headless", "runpod_worker"}, installed
    assert not (target / "nodes").exists() and not (target / "nodes.py").exists()
    # the installed runner and engine parameters import from there (the repository is not on the path)
    env = dict(isolated_env(tmp_path), PYTHONPATH=str(target))
    probe = subprocess.run([sys.executable, "-c", "import headless.cli, headless.workflow, wan22.request.params; "
                            "assert headless.workflow.default_workflow_path().is_file(); print(headless.cli.__file__)"],
                           env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
    # docs/headless.md's `pip install .` then `wan22-i2v --help`: the console script pip wrote
    helped = subprocess.run([str(target / "bin" / "wan22-i2v"), "--help"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: wan22-i2v"), helped.stdout + helped.stderr
