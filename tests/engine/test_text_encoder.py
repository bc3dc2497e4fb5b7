"""The text encoder's shortcuts against upstream's way on a tiny UMT5: only the real tokens, cached embeddings,
fp32 compute over bf16 weights."""
import copy

import pytest
import torch

from wan22.checkpoints import modules
from wan22.runtime import text_encoder
from wan22.request.model_sets import discover_model_set
from wan22.pipeline import LoadOptions, UPSTREAM_NEGATIVE_PROMPT
from wan22.loader import load_pipeline

PROMPT = "A small cat walks slowly across the green field at sunset."


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return load_pipeline(tiny_models("upstream"), LoadOptions(dtype="fp32", device="cpu")).prompt_encoder


def counting_forwards(model):
    """Each forward's input_ids shape (batch, tokens)."""
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(tuple(kwargs["input_ids"].shape)),
                                         with_kwargs=True)
    return calls, handle


def upstream_way(encoder, prompt: str) -> torch.Tensor:
    """Upstream's T5EncoderModel: ids padded to 512 with the mask, the output cut at the real length."""
    ids, mask = encoder.token_ids(prompt)
    with torch.no_grad():
        hidden = encoder.model(input_ids=ids[None], attention_mask=mask[None]).last_hidden_state[0]
    return hidden[: int(mask.sum())].float()


def test_real_tokens_only_give_upstreams_embeddings(encoder):
    calls, handle = counting_forwards(encoder.model)
    try:
        ours = text_encoder.PromptEncoder(encoder.tokenizer, encoder.model, torch.device("cpu")).encode([PROMPT, UPSTREAM_NEGATIVE_PROMPT])
    finally:
        handle.remove()
    for got, prompt in zip(ours, (PROMPT, UPSTREAM_NEGATIVE_PROMPT)):
        want = upstream_way(encoder, prompt)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() < 1e-5
    assert calls == [(1, got.shape[0]) for got in ours] and max(n for _, n in calls) < text_encoder.TEXT_LEN  # never 512


def test_recent_embeddings_are_cached_per_text_and_device(encoder):
    fresh = text_encoder.PromptEncoder(encoder.tokenizer, encoder.model, torch.device("cpu"), cache_size=3)
    calls, handle = counting_forwards(encoder.model)
    try:
        first = fresh.encode([PROMPT, UPSTREAM_NEGATIVE_PROMPT])
        assert len(calls) == 2
        fresh.encode(["waves at night", UPSTREAM_NEGATIVE_PROMPT])
        assert len(calls) == 3  # the negative prompt came from the cache
        again = fresh.encode([f"  {PROMPT} ", UPSTREAM_NEGATIVE_PROMPT])  # the same text once cleaned
        assert len(calls) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
        assert fresh.missing([PROMPT, "new"]) == ["new"] and fresh.missing([PROMPT], torch.device("meta")) == [PROMPT]
        fresh.encode(["one", "two"])  # 3 kept: the least recently used ("waves at night", then PROMPT) go
        assert fresh.missing(["waves at night", PROMPT, UPSTREAM_NEGATIVE_PROMPT]) == ["waves at night", PROMPT]
    finally:
        handle.remove()


def bf16_encoder(tiny_models):
    model_set = discover_model_set(tiny_models("upstream"))
    model = modules.load_t5_from_upstream_pth(model_set.files["text_encoder"], torch.bfloat16, "cpu")
    return model


def test_fp32_compute_over_bf16_weights_matches_an_fp32_copy_and_keeps_the_weights(tiny_models, encoder):
    model = bf16_encoder(tiny_models)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    widened = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, all in fp32
    ids = torch.tensor([encoder.tokenizer.token_lists([PROMPT])[0]])
    with torch.no_grad():
        want = widened(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        with text_encoder.computing_in(model, torch.float32):
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert got.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert (got - want).abs().max() < 1e-5
    assert (plain.float() - want).abs().max() > 10 * (got - want).abs().max()  # bf16 compute rounds visibly
    assert model.shared.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():  # stored as before (bf16), unchanged
        assert p.dtype == before[name].dtype and torch.equal(p, before[name]), name


def test_a_projection_computes_in_fp32_slice_by_slice_over_its_stored_weight(monkeypatch):
    """Slices of 64 output rows (150 = 64 + 64 + 22, bias included) give the fp32 projection of the same weights."""
    monkeypatch.setattr(text_encoder, "CAST_CHUNK_ELEMENTS", 64 * 100)
    linear = torch.nn.Linear(100, 150).to(torch.bfloat16)
    x = torch.randn(2, 7, 100, dtype=torch.bfloat16)
    got = text_encoder._linear_computing_in(linear, torch.float32)(x)
    want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert got.dtype == torch.float32 and got.shape == (2, 7, 150)
    assert (got - want).abs().max() < 1e-5
    assert linear.weight.dtype == torch.bfloat16  # stored as it was


def test_the_cpu_compute_dtype_follows_the_machine(tiny_models, encoder, monkeypatch):
    model = bf16_encoder(tiny_models)
    widened = copy.deepcopy(model).float()
    reference = text_encoder.PromptEncoder(encoder.tokenizer, widened, torch.device("cpu")).encode([PROMPT])[0]
    fast, why = text_encoder.cpu_has_fast_bf16()  # this machine's answer, from its capabilities
    assert isinstance(fast, bool) and why
    for fast in (False, True):
        monkeypatch.setattr(text_encoder, "cpu_has_fast_bf16", lambda: (fast, "test"))
        got = text_encoder.PromptEncoder(encoder.tokenizer, model, torch.device("cpu")).encode([PROMPT])[0]
        diff = (got - reference).abs().max()
        assert (diff > 1e-4) if fast else (diff < 1e-5), (fast, diff)


# (this CPU's bf16 instructions, the ISA cap (ONEDNN_MAX_CPU_ISA value; None: unset), bf16 compute?)
BF16_DECISIONS = [
    (set(), None, False), (set(), "AVX10_1_512_AMX", False), (set(), "DEFAULT", False),
    ({"avx512_bf16"}, None, True), ({"avx512_bf16"}, "ALL", True), ({"avx512_bf16"}, "default", True),
    ({"avx512_bf16"}, "NOT_AN_ISA", True),  # oneDNN ignores a name it does not know
    ({"avx512_bf16"}, "AVX512_CORE_BF16", True), ({"avx512_bf16"}, "avx512_core_bf16", True),
    ({"avx512_bf16"}, "AVX10_1_512", True), ({"avx512_bf16"}, "AVX512_CORE_FP16", True),
    ({"avx512_bf16"}, "AVX512_CORE_AMX", True), ({"avx512_bf16"}, "AVX10_1_512_AMX_FP16", True),
    ({"avx512_bf16"}, "AVX512_CORE_VNNI", False), ({"avx512_bf16"}, "AVX512_CORE", False),
    ({"avx512_bf16"}, "avx512_core", False), ({"avx512_bf16"}, "AVX2_VNNI_2", False), ({"avx512_bf16"}, "AVX2_VNNI", False),
    ({"avx512_bf16"}, "AVX2", False), ({"avx512_bf16"}, "AVX", False), ({"avx512_bf16"}, "SSE41", False),
    ({"amx_bf16", "avx512_bf16"}, None, True), ({"amx_bf16", "avx512_bf16"}, "AVX10_1_512_AMX", True),
    ({"amx_bf16", "avx512_bf16"}, "AVX512_CORE_BF16", True), ({"amx_bf16", "avx512_bf16"}, "AVX512_CORE", False),
    ({"amx_bf16"}, "AVX512_CORE_AMX", True), ({"amx_bf16"}, "AVX512_CORE_AMX_FP16", True),
    ({"amx_bf16"}, "AVX10_1_512", False), ({"amx_bf16"}, "AVX512_CORE_BF16", False),
]


@pytest.fixture
def bf16_decision(monkeypatch):
    """cpu_has_fast_bf16() for a given CPU and ISA cap, computed afresh (it is cached per process)."""
    def decide(instructions, cap, var="ONEDNN_MAX_CPU_ISA"):
        monkeypatch.setattr(text_encoder, "cpu_bf16_instructions", lambda: set(instructions))
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(name, raising=False)
        if cap is not None:
            monkeypatch.setenv(var, cap)
        text_encoder.cpu_has_fast_bf16.cache_clear()
        return text_encoder.cpu_has_fast_bf16()

    yield decide
    text_encoder.cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize("instructions, cap, fast", BF16_DECISIONS)
def test_bf16_compute_where_onednn_can_use_native_bf16_matmuls(bf16_decision, instructions, cap, fast):
    got, why = bf16_decision(instructions, cap)
    assert got is fast, why
    assert all(f in why for f in instructions) if instructions else "no native bf16" in why, why
    if instructions and not fast:  # the cap is what kept them out
        assert f"ONEDNN_MAX_CPU_ISA={cap.upper()} keeps oneDNN below" in why, why


def test_the_older_dnnl_cap_counts_and_the_onednn_one_wins(bf16_decision, monkeypatch):
    assert bf16_decision({"avx512_bf16"}, "AVX512_CORE", var="DNNL_MAX_CPU_ISA") == (
        False, "this CPU has avx512_bf16; DNNL_MAX_CPU_ISA=AVX512_CORE keeps oneDNN below AVX512_CORE_BF16 (avx512_bf16)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    text_encoder.cpu_has_fast_bf16.cache_clear()
    assert text_encoder.cpu_has_fast_bf16()[0] is True


def test_the_decision_is_made_once_and_logged_once(bf16_decision, monkeypatch, caplog):
    bf16_decision({"avx512_bf16"}, None)  # no ISA cap in the environment
    calls = []
    monkeypatch.setattr(text_encoder, "cpu_bf16_instructions", lambda: calls.append(1) or {"avx512_bf16"})
    text_encoder.cpu_has_fast_bf16.cache_clear()
    with caplog.at_level("INFO", logger="wan22"):
        first, again = text_encoder.cpu_has_fast_bf16(), text_encoder.cpu_has_fast_bf16()
    assert first == again and len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [f"Wan22 text encoder on the CPU: {first[1]}, so it computes in bf16"]


def test_the_cpus_bf16_instructions_come_from_torch_or_proc_cpuinfo(monkeypatch):
    assert text_encoder.cpu_bf16_instructions() <= set(text_encoder.BF16_MATMUL_ISA)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True, "avx2": True},
                        raising=False)
    assert text_encoder.cpu_bf16_instructions() == {"avx512_bf16"}
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(text_encoder, "Path", lambda name: FakeFile("processor : 0\nflags : fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"))
    assert text_encoder.cpu_bf16_instructions() == {"avx512_bf16", "amx_bf16"}


class FakeFile:
    def __init__(self, content: str):
        self.content = content

    def read_text(self) -> str:
        return self.content


def test_an_embedding_does_not_depend_on_what_the_cache_holds(encoder):
    """The same text, encoded alone or beside another uncached one, gives the same bits: a seed's video must not
    change with the cache."""
    alone = text_encoder.PromptEncoder(encoder.tokenizer, encoder.model, torch.device("cpu")).encode([PROMPT])[0]
    beside = text_encoder.PromptEncoder(encoder.tokenizer, encoder.model, torch.device("cpu")).encode([PROMPT, UPSTREAM_NEGATIVE_PROMPT])[0]
    assert torch.equal(alone, beside)
