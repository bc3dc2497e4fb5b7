"""Fast tests of runpod_worker.confine: a raw workflow may read only the images uploaded with its own job.

The object_info entries copy the shapes ComfyUI's GET /object_info answers (2024 nodes.py and v0.3.64's v3
schema nodes), with short file lists.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from runpod_worker.confine import confine_workflow, file_inputs  # noqa: E402
from wan22.request.errors import InvalidParameter  # noqa: E402

FILES = ["example.png", "wan22_job_other/raw_in.png"]
OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [FILES, {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
    "LoadImageMask": {"input": {"required": {"image": [FILES, {"image_upload": True}],
                                             "channel": [["alpha", "red", "green", "blue"]]}}},
    "LoadImageOutput": {"input": {"required": {"image": ["COMBO", {
        "image_upload": True, "image_folder": "output",
        "remote": {"route": "/internal/files/output", "refresh_button": True, "control_after_refresh": "first"}}]}}},
    "ComboLoader": {"input": {"required": {"picture": ["COMBO", {"options": FILES, "image_upload": True}]}}},
    "LoadVideo": {"input": {"required": {"file": ["COMBO", {"options": ["clip.mp4"], "video_upload": True}]}}},
    "LoadAudio": {"input": {"required": {"audio": [["a.wav"], {"audio_upload": True}]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                                              "clip": ["CLIP"]}}, "output": ["CONDITIONING"]},
    "CLIPLoader": {"input": {"required": {"clip_name": [["t5.safetensors"]], "type": [["wan"]]}}, "output": ["CLIP"]},
    "SomeCustomNode": {"input": {"optional": {name: ["STRING", {}] for name in (
        "some_path", "path", "cache_dir", "out_directory", "lora_folder", "directory", "folder", "text", "name", "other",
        "source", "filename")}}, "output": []},
    "SomeStringNode": {"input": {"required": {"value": ["STRING", {}]}}, "output": ["STRING"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}, "output": []},
    "Wan22ModelLoader": {"input": {"required": {
        "model_set": [["Wan2.2-I2V-A14B"], {"default": "Wan2.2-I2V-A14B"}],
        "model_path": ["STRING", {"default": "", "tooltip": "model folder"}]}}},
    "Wan22LoadImage": {"input": {"required": {
        "image_url": ["STRING", {"default": ""}], "image_base64": ["STRING", {"default": "", "multiline": True}],
        "image_path": ["STRING", {"default": ""}]}}, "output": ["IMAGE"]},
}
CLIP = {"2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "wan"}}}
UPLOADS = {"raw_in.png": "wan22_job_3f9a/raw_in.png"}


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def refused(workflow, uploads=UPLOADS, exists=lambda name: False):
    with pytest.raises(InvalidParameter) as info:
        confine_workflow(workflow, OBJECT_INFO, uploads, exists)
    return dict(info.value.problems)


def test_file_inputs_reads_every_upload_flag():
    assert file_inputs(OBJECT_INFO, "LoadImage") == {"image"}
    assert file_inputs(OBJECT_INFO, "LoadImageMask") == {"image"}
    assert file_inputs(OBJECT_INFO, "LoadImageOutput") == {"image"}
    assert file_inputs(OBJECT_INFO, "ComboLoader") == {"picture"}
    assert file_inputs(OBJECT_INFO, "LoadVideo") == {"file"}
    assert file_inputs(OBJECT_INFO, "LoadAudio") == {"audio"}
    assert file_inputs(OBJECT_INFO, "CLIPTextEncode") == set()
    assert file_inputs(OBJECT_INFO, "NoSuchNode") == set()
    assert file_inputs({"X": {"input": {"optional": {"f": ["COMBO", {"upload": "image"}]}}}}, "X") == {"f"}


def test_own_upload_is_renamed_and_input_not_mutated():
    workflow = {"1": node("LoadImage", image="raw_in.png"),
                "2": node("SaveImage", images=["1", 0], filename_prefix="wan22/out")}
    before = copy.deepcopy(workflow)
    confined = confine_workflow(workflow, OBJECT_INFO, UPLOADS)
    assert confined["1"]["inputs"]["image"] == "wan22_job_3f9a/raw_in.png"
    assert confined["2"]["inputs"] == {"images": ["1", 0], "filename_prefix": "wan22/out"}
    assert workflow == before


def test_non_path_string_equal_to_an_upload_is_renamed():
    workflow = {"1": node("SomeCustomNode", name="raw_in.png", other="raw_in")}
    confined = confine_workflow(workflow, OBJECT_INFO, UPLOADS)
    assert confined["1"]["inputs"] == {"name": "wan22_job_3f9a/raw_in.png", "other": "raw_in"}


def test_absolute_path_in_load_image():
    problems = refused({"1": node("LoadImage", image="/etc/x.png")})
    assert problems == {"workflow.1.inputs.image": "'/etc/x.png' is not an image uploaded with this job; send the file "
                                                   'in "images" and use its name (this job uploaded: raw_in.png)'}


def test_no_uploads_says_so():
    problems = refused({"1": node("LoadImage", image="example.png")}, uploads={})
    assert "this job uploaded no images" in problems["workflow.1.inputs.image"]


@pytest.mark.parametrize("value", ["../x.png", "raw_in.png [output]", "x.png [temp]", "x.png [input]",
                                   "wan22_job_other/raw_in.png", "example.png"])
def test_load_image_refuses_anything_but_own_upload(value):
    problems = refused({"7": node("LoadImage", image=value)})
    assert "is not an image uploaded with this job" in problems["workflow.7.inputs.image"]


@pytest.mark.parametrize("value, why", [
    ("/etc/x.png", "an absolute path"), ("~/x.png", "an absolute path"), ("C:\\x.png", "an absolute path"),
    ("C:/x.png", "an absolute path"), ("\\\\server\\share\\x.png", "an absolute path"),
    ("../x.png", "'..' segment"), ("a\\..\\x.png", "'..' segment"),
    ("x.png [output]", "annotated [output]"), ("x.png [temp]", "annotated [temp]"), ("x.png [input]", "annotated [input]"),
    ("x.pngg[output]", "annotated [output]"),
])
def test_path_like_strings_refused_in_any_input(value, why):
    problems = refused({"3": node("SomeCustomNode", source=value)})
    assert why in problems["workflow.3.inputs.source"]
    assert "on the worker's disk" in problems["workflow.3.inputs.source"]


def test_another_jobs_upload_is_refused():
    existing = {"wan22_job_other/raw_in.png", "operator.png"}
    problems = refused({"4": node("SomeCustomNode", filename="wan22_job_other/raw_in.png"),
                        "5": node("SomeCustomNode", filename="raw_in.png")}, exists=existing.__contains__)
    assert list(problems) == ["workflow.4.inputs.filename"]
    assert "is a file in ComfyUI's input folder that this job did not upload" in problems["workflow.4.inputs.filename"]


def test_link_into_load_image_is_refused():
    problems = refused({"1": node("LoadImage", image=["5", 0]), "5": node("SomeStringNode", value="raw_in.png")})
    assert problems["workflow.1.inputs.image"].startswith("is a link to node 5; a file input must name an image uploaded")


def test_load_image_mask():
    workflow = {"2": node("LoadImageMask", image="/tmp/m.png", channel="alpha")}
    problems = refused(workflow)
    assert list(problems) == ["workflow.2.inputs.image"]
    assert "is not an image uploaded with this job" in problems["workflow.2.inputs.image"]
    ok = confine_workflow({"2": node("LoadImageMask", image="raw_in.png", channel="alpha")}, OBJECT_INFO, UPLOADS)
    assert ok["2"]["inputs"] == {"image": "wan22_job_3f9a/raw_in.png", "channel": "alpha"}


def test_combo_spec_with_image_upload():
    problems = refused({"8": node("ComboLoader", picture="example.png")})
    assert "'example.png' is not an image uploaded with this job" in problems["workflow.8.inputs.picture"]


def test_load_image_output_reads_no_output_file():
    problems = refused({"8": node("LoadImageOutput", image="ComfyUI_00001_.png")})
    assert "is not an image uploaded with this job" in problems["workflow.8.inputs.image"]


def test_load_video_file_with_video_upload():
    problems = refused({"9": node("LoadVideo", file="clip.mp4")})
    assert "'clip.mp4' is not an image uploaded with this job" in problems["workflow.9.inputs.file"]
    problems = refused({"9": node("LoadAudio", audio="a.wav")})
    assert "'a.wav' is not an image uploaded with this job" in problems["workflow.9.inputs.audio"]


def test_wan22_model_loader_model_path():
    problems = refused({"1": node("Wan22ModelLoader", model_set="Wan2.2-I2V-A14B", model_path="/workspace/models")})
    assert problems == {"workflow.1.inputs.model_path": "'/workspace/models': model and file paths are the operator's "
                        "in raw mode: the worker reads its models from WAN_CKPT_DIR; leave it empty"}
    for empty in ("", "  "):
        confined = confine_workflow({"1": node("Wan22ModelLoader", model_set="Wan2.2-I2V-A14B", model_path=empty)},
                                    OBJECT_INFO, UPLOADS)
        assert confined["1"]["inputs"]["model_path"] == empty
    problems = refused({"1": node("Wan22ModelLoader", model_set="Wan2.2-I2V-A14B", model_path=["2", 0])})
    assert problems["workflow.1.inputs.model_path"].startswith("is a link to node 2; model and file paths are the operator's")


def test_wan22_load_image_image_path():
    problems = refused({"1": node("Wan22LoadImage", image_url="", image_base64="", image_path="raw_in.png")})
    assert list(problems) == ["workflow.1.inputs.image_path"]
    assert "model and file paths are the operator's in raw mode" in problems["workflow.1.inputs.image_path"]


def test_wan22_load_image_base64_and_url_are_not_paths():
    jpeg = "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHR"
    for sources in ({"image_base64": jpeg}, {"image_url": "https://example.com/a.png"}):
        workflow = {"1": node("Wan22LoadImage", **dict({"image_url": "", "image_base64": "", "image_path": ""}, **sources))}
        assert confine_workflow(workflow, OBJECT_INFO, UPLOADS) == workflow


@pytest.mark.parametrize("name", ["some_path", "path", "cache_dir", "out_directory", "lora_folder", "directory", "folder"])
def test_unknown_custom_node_path_named_input(name):
    problems = refused({"6": node("SomeCustomNode", **{name: "models/x"})})
    assert "model and file paths are the operator's" in problems[f"workflow.6.inputs.{name}"]


def test_multiline_prompt_with_paths_is_allowed():
    prompt = "a cat reading /etc/passwd\nthen walking ../ into the sunset [output]"
    workflow = {"1": node("CLIPTextEncode", text=prompt, clip=["2", 0]), **CLIP}
    assert confine_workflow(workflow, OBJECT_INFO, UPLOADS) == workflow


def test_single_line_prompt_in_a_text_box_is_allowed_but_not_elsewhere():
    workflow = {"1": node("CLIPTextEncode", text="/imagine ../ a cat [output]", clip=["2", 0]), **CLIP}
    assert confine_workflow(workflow, OBJECT_INFO, UPLOADS) == workflow
    problems = refused({"1": node("SomeCustomNode", text="/imagine a cat")})
    assert "looks like an absolute path on the worker's disk" in problems["workflow.1.inputs.text"]


def test_several_problems_are_all_named():
    workflow = {"1": node("LoadImage", image="/etc/x.png"),
                "2": node("LoadImage", image="raw_in.png"),
                "3": node("Wan22ModelLoader", model_set="Wan2.2-I2V-A14B", model_path="/x"),
                "4": node("SaveImage", images=["2", 0], filename_prefix="../../escape"),
                "5": node("CLIPTextEncode", text="fine", clip=["6", 0]), "6": CLIP["2"]}
    with pytest.raises(InvalidParameter) as info:
        confine_workflow(workflow, OBJECT_INFO, UPLOADS)
    assert [field for field, _ in info.value.problems] == [
        "workflow.1.inputs.image", "workflow.3.inputs.model_path", "workflow.4.inputs.filename_prefix"]
    assert info.value.field == "workflow.1.inputs.image"
    assert "workflow.4.inputs.filename_prefix: '../../escape' looks like a path with a '..' segment" in str(info.value)


# ---------------------------------------------------------------- the graph: what ComfyUI's validation does not check
POISON = {"1": node("LoadImage", image="raw_in.png"),
          "2": node("SaveImage", images=["1", 0], filename_prefix="a", junk=["nope", 0])}


def test_an_undeclared_input_is_refused_naming_node_input_and_the_declared_ones():
    problems = refused(POISON)
    assert problems == {"workflow.2.inputs.junk": "SaveImage has no input 'junk'; its inputs: extra_pnginfo, "
                                                  "filename_prefix, images, prompt"}


def test_hidden_inputs_are_declared_ones():
    workflow = {"1": node("LoadImage", image="raw_in.png"),
                "2": node("SaveImage", images=["1", 0], filename_prefix="a", prompt={}, extra_pnginfo={})}
    assert confine_workflow(workflow, OBJECT_INFO, UPLOADS)["2"]["inputs"]["prompt"] == {}


@pytest.mark.parametrize("link, why", [
    (["nope", 0], "links to node 'nope', which is not in the workflow"),
    (["1", 2], "links to output 2 of node 1 (LoadImage), which has outputs 0 to 1"),
    (["1", -1], "links to output -1 of node 1 (LoadImage), which has outputs 0 to 1"),
    (["3", 0], "links to output 0 of node 3 (SaveImage), which has outputs none: it has no outputs"),
    (["1", "0"], "['1', '0']: a list is a link in ComfyUI's API format: [node id (a string), output index]"),
    ([1, 0], "[1, 0]: a list is a link in ComfyUI's API format"),
    (["1", 0, 0], "['1', 0, 0]: a list is a link in ComfyUI's API format"),
    (["1", True], "['1', True]: a list is a link in ComfyUI's API format"),
    ([], "[]: a list is a link in ComfyUI's API format"),
])
def test_every_link_names_an_existing_node_and_one_of_its_outputs(link, why):
    problems = refused({"1": node("LoadImage", image="raw_in.png"), "2": node("SaveImage", images=link, filename_prefix="a"),
                        "3": node("SaveImage", images=["1", 0], filename_prefix="b")})
    assert why in problems["workflow.2.inputs.images"]


def test_unknown_node_classes_and_shapes_are_refused():
    problems = refused({"1": node("NoSuchNode", x=1), "2": "not a node", "3": {"class_type": "LoadImage", "inputs": [1]},
                        "4": {"inputs": {}}})
    assert problems["workflow.1.class_type"].startswith("'NoSuchNode' is not a node this worker's ComfyUI has")
    assert problems["workflow.2"].startswith("must be a node")
    assert problems["workflow.3.inputs"].startswith("must be an object")
    assert problems["workflow.4.class_type"].startswith("None is not a node")


def test_a_loop_of_links_is_refused():
    problems = refused({"1": node("SomeStringNode", value=["2", 0]), "2": node("SomeStringNode", value=["1", 0]),
                        "3": node("SomeStringNode", value=["3", 0])})
    loops = {k: v for k, v in problems.items() if "loop" in v}
    assert len(loops) == 1 and ("(1 -> 2 -> 1)" in next(iter(loops.values())) or "(3 -> 3)" in next(iter(loops.values())))


@pytest.mark.parametrize("value", ["../../x\n", "/etc/x\r\n", "fine\n../../x", " x.png [output]\n"])
def test_a_line_break_hides_no_path_outside_text_boxes(value):
    problems = refused({"1": node("LoadImage", image="raw_in.png"),
                        "2": node("SaveImage", images=["1", 0], filename_prefix=value)})
    assert "on the worker's disk" in problems["workflow.2.inputs.filename_prefix"]
