"""Prompt extension (wan22.prompt_extend): the real Qwen2.5-VL load/generate path on a tiny random-weight folder the
tests build, DashScope against a loopback server answering in its documented shapes, and the refusals."""
import json
import time

import pytest
import torch
from PIL import Image

import comfy_fixture as cf
from wan22 import prompt_extend as pe
from wan22.request.errors import InvalidParameter
from wan22.testing.tiny import build_tiny_qwen_vl

IMAGE = Image.new("RGB", (120, 80), (200, 40, 40))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_qwen_vl(root / "LLM" / "Qwen2.5-VL-7B-Instruct")
    return [root]


@pytest.fixture(scope="module")
def expander(roots):
    return pe.LocalQwenExpander(pe.find_local_model("QwenVL2.5_7B", roots))


def test_local_qwen_extension_is_the_seeded_decoded_generation(roots, expander):
    loaded = []
    first = pe.extend(IMAGE, "a cat", 7, roots=roots, local=lambda folder: loaded.append(folder) or expander)
    assert first.status == "extended" and first.method == "local_qwen" and first.model == "QwenVL2.5_7B"
    assert loaded == [roots[0] / "LLM" / "Qwen2.5-VL-7B-Instruct"]
    # independently: the same chat, image and seed through transformers directly
    messages = [{"role": "system", "content": [{"type": "text", "text": pe.SYSTEM_PROMPTS["zh"]}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"}]}]
    text = expander.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = expander.processor(text=[text], images=[IMAGE], return_tensors="pt")
    torch.manual_seed(7)
    out = expander.model.generate(**inputs, max_new_tokens=pe.MAX_NEW_TOKENS)
    want = expander.processor.batch_decode([out[0, inputs["input_ids"].shape[1]:]], skip_special_tokens=True)[0]
    assert first.prompt == pe.clean_description(want) and first.prompt and first.prompt != "a cat"
    assert pe.extend(IMAGE, "a cat", 7, roots=roots, local=lambda folder: expander).prompt == first.prompt
    assert pe.extend(IMAGE, "a cat", 8, roots=roots, local=lambda folder: expander).prompt != first.prompt
    english = pe.extend(IMAGE, "a cat", 7, lang="en", roots=roots, local=lambda folder: expander)
    assert english.status == "extended" and english.prompt != first.prompt  # another system prompt


def test_a_failed_generation_falls_back_or_is_an_error_when_strict(roots, expander, monkeypatch):
    monkeypatch.setattr(expander, "expand", lambda *args: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    fallback = pe.extend(IMAGE, "a cat", 7, roots=roots, local=lambda folder: expander)
    assert (fallback.prompt, fallback.status) == ("a cat", "fallback: CUDA out of memory")
    with pytest.raises(pe.PromptExtendFailed, match=r"prompt extension \(local_qwen, QwenVL2.5_7B\) failed: CUDA out of memory"):
        pe.extend(IMAGE, "a cat", 7, strict=True, roots=roots, local=lambda folder: expander)


@pytest.mark.parametrize("kwargs, field, message", [
    ({"method": "openai"}, "prompt_extend_method", "must be one of local_qwen, dashscope, got 'openai'"),
    ({"lang": "fr"}, "prompt_extend_target_lang", "must be one of zh, en, got 'fr'"),
    ({"model": "/etc/passwd"}, "prompt_extend_model", "give a model name (QwenVL2.5_7B, QwenVL2.5_3B) or a folder name"),
    ({"model": "../models"}, "prompt_extend_model", "not a path"),
    ({"model": "QwenVL2.5_3B"}, "prompt_extend_model", "no Qwen2.5-VL-3B-Instruct folder with a config.json under the model roots"),
    ({"method": "dashscope"}, "prompt_extend_method", "dashscope needs DASH_API_KEY set on the server"),
])
def test_bad_settings_are_refused_naming_the_field(roots, kwargs, field, message):
    with pytest.raises(InvalidParameter) as info:
        pe.extend(IMAGE, "a cat", 1, roots=roots, environ={}, **kwargs)
    assert info.value.field == field and message in str(info.value)
    if kwargs.get("model") == "QwenVL2.5_3B":
        assert "<root>/LLM/Qwen2.5-VL-3B-Instruct" in str(info.value) and str(roots[0]) not in str(info.value)


def dashscope_routes(answer):
    seen = []

    def handle(handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        seen.append((handler.headers.get("Authorization"), body))
        answer(handler)
    return {"POST /api": handle}, seen


def test_dashscope_request_and_answer_in_the_documented_shapes():
    reply = {"output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": [
        {"text": "A red square glows; the camera dollies in slowly."}]}}]}, "usage": {"output_tokens": 12}, "request_id": "r1"}
    routes, seen = dashscope_routes(lambda h: cf.reply(h, 200, json.dumps(reply).encode(), "application/json"))
    with cf.loopback_http(routes) as url:
        got = pe.extend(IMAGE, "a red square", 2**40 + 5, method="dashscope", lang="en",
                        environ={"DASH_API_KEY": "sk-test", "DASH_API_URL": url + "/api"})
    assert (got.prompt, got.status, got.model, got.device) == ("A red square glows; the camera dollies in slowly.", "extended",
                                                               "qwen-vl-max", "remote")
    [(auth, body)] = seen
    assert auth == "Bearer sk-test" and body["model"] == "qwen-vl-max"
    system, user = body["input"]["messages"]
    assert system == {"role": "system", "content": [{"text": pe.SYSTEM_PROMPTS["en"]}]}
    assert user["content"][0]["image"].startswith("data:image/png;base64,") and user["content"][1] == {"text": "a red square"}
    assert body["parameters"] == {"seed": (2**40 + 5) % 2**31, "max_tokens": 512, "result_format": "message"}


@pytest.mark.parametrize("answer, why", [
    (lambda h: cf.reply(h, 401, json.dumps({"code": "InvalidApiKey", "message": "Invalid API-key provided."}).encode(),
                        "application/json"), "fallback: DashScope answered HTTP 401 (InvalidApiKey)"),
    (lambda h: cf.reply(h, 200, b"<html>gateway</html>", "text/html"),
     "fallback: DashScope answered HTTP 200 with a body that is not JSON"),
    (lambda h: cf.reply(h, 200, json.dumps({"output": {"text": "old format"}}).encode(), "application/json"),
     "fallback: DashScope's answer has no output.choices[0].message.content"),
    (lambda h: (time.sleep(1.5), cf.reply(h, 200, b"{}", "application/json")), "fallback: DashScope gave no answer within 0.5 s"),
])
def test_dashscope_failures_fall_back_with_the_reason(answer, why):
    routes, _ = dashscope_routes(answer)
    with cf.loopback_http(routes) as url:
        got = pe.extend(IMAGE, "a red square", 3, method="dashscope",
                        environ={"DASH_API_KEY": "k", "DASH_API_URL": url + "/api", "DASH_API_TIMEOUT_S": "0.5"})
    assert (got.prompt, got.status) == ("a red square", why)


def test_the_model_writes_on_the_gpu_only_when_it_fits_there(expander, monkeypatch):
    """No GPU here: a cuda device that is not there (or too full) means writing on the CPU, said in `device`."""
    moved = []
    monkeypatch.setattr(expander, "to", lambda device: moved.append(device) or expander)
    text, where = expander.expand_on("cuda:0", IMAGE, "a cat", "en", 1)
    assert where == "cpu" and moved == ["cpu"] and text
    monkeypatch.setattr(expander, "fits", lambda device: True)
    _, where = expander.expand_on("cuda:0", IMAGE, "a cat", "en", 1)
    assert where == "cuda:0" and moved[-2:] == ["cuda:0", "cpu"]  # and back to the CPU after writing


def test_a_description_becomes_a_clean_bounded_prompt(monkeypatch):
    monkeypatch.setenv("WAN_MAX_PROMPT_CHARS", "20")
    assert pe.clean_description("A cat\x00 walks\n\tslowly \u200b across the long field") == "A cat walks slowly"
    assert pe.clean_description("\x00\x07 ") == ""
