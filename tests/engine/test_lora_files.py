"""wan22.request.lora_files: a LoRA named by a request or a command line (name, expert, strength) resolves only to a
.safetensors file inside the LoRA folders."""
from __future__ import annotations

import os

import pytest

from wan22.request.errors import InvalidParameter
from wan22.request.lora_files import parse_entry, resolve_lora


def test_lora_names_resolve_only_inside_the_lora_folders(tmp_path):
    folder, outside = tmp_path / "loras", tmp_path / "elsewhere"
    (folder / "styles").mkdir(parents=True)
    outside.mkdir()
    (folder / "styles" / "ink.safetensors").write_bytes(b"x")
    (outside / "secret.safetensors").write_bytes(b"x")
    os.symlink(outside / "secret.safetensors", folder / "link.safetensors")
    assert resolve_lora("styles/ink.safetensors", [folder], "f") == (folder / "styles" / "ink.safetensors").resolve()
    for name, why in (("link.safetensors", "no LoRA file 'link.safetensors' in the LoRA folders"),
                      ("../elsewhere/secret.safetensors", "must be a file name relative to a LoRA folder"),
                      (str(outside / "secret.safetensors"), "must be a file name relative to a LoRA folder"),
                      ("C:\\loras\\x.safetensors", "must be a file name relative to a LoRA folder"),
                      ("styles/ink.ckpt", "must be a .safetensors file")):
        with pytest.raises(InvalidParameter, match=why) as info:
            resolve_lora(name, [folder], "params.loras[0].name")
        assert info.value.field == "params.loras[0].name"


@pytest.mark.parametrize("text, entry", [
    ("a.safetensors", ("a.safetensors", "both", 1.0)),
    ("a.safetensors:low", ("a.safetensors", "low", 1.0)),
    ("a.safetensors:0.25", ("a.safetensors", "both", 0.25)),
    ("dir/a.safetensors:HIGH:-1.5", ("dir/a.safetensors", "high", -1.5)),
    ("/abs/a.safetensors:both:2", ("/abs/a.safetensors", "both", 2.0)),
])
def test_cli_lora_text_is_name_expert_strength(text, entry):
    parsed = parse_entry(text, "loras[0]")
    assert (parsed.name, parsed.expert, parsed.strength) == entry


@pytest.mark.parametrize("text, said", [
    ("my_style.safetensors:hgih", "got 'hgih'; did you mean high?"),
    ("my_style.safetensors:lwo:0.5", "got 'lwo'; did you mean low?"),
    ("my_style.safetensors:xyz", "got 'xyz'"),
])
def test_a_misspelt_expert_is_refused_not_taken_into_the_name(text, said):
    with pytest.raises(InvalidParameter) as info:
        parse_entry(text, "loras[0]")
    assert info.value.field == "loras[0].expert" and "must be one of high|low|both" in info.value.why
    assert said in info.value.why
