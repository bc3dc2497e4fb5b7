"""Prompt encoding as upstream (UMT5, the output trimmed to the real tokens), at a fraction of its cost.

Upstream pads every prompt to 512 tokens and encodes it in the checkpoint's dtype (bf16) on every request. The
output at the real tokens does not depend on the padding (padded keys are masked out, positions are relative),
so only the real tokens are encoded; recent embeddings are kept per encoder (the negative prompt is usually the
same on every request); on a CPU without native bf16 matmul instructions (AMX-BF16, AVX512-BF16), each block
computes in fp32 over its bf16 weights.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import html
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..request.errors import CheckpointError

TEXT_LEN = 512
CACHED_PROMPTS = 16  # embeddings kept per encoder: [tokens, 4096] fp32, at most 8 MiB each

log = logging.getLogger("wan22")


def clean_prompt(text: str) -> str:
    """Upstream's `whitespace_clean(basic_clean(text))` (ftfy.fix_text is applied when ftfy is installed)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class HuggingFaceTokenizer:
    """A tokenizer folder (upstream google/umt5-xxl/, diffusers tokenizer/), read offline."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{folder}: tokenizer files unreadable ({exc})") from exc

    def token_lists(self, texts: List[str]) -> List[List[int]]:
        out = self._tokenizer(texts, truncation=True, max_length=TEXT_LEN, add_special_tokens=True)
        return [list(ids) for ids in out.input_ids]


class SentencePieceTokenizer:
    """The sentencepiece model embedded in ComfyUI text-encoder files: no BOS, EOS (1) appended, pad 0."""

    def __init__(self, model_proto: bytes, eos_id: int = 1, pad_id: int = 0):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:
            raise CheckpointError(f"embedded spiece_model is not a sentencepiece model ({exc})") from exc
        self.eos_id, self.pad_id = eos_id, pad_id

    def token_lists(self, texts: List[str]) -> List[List[int]]:
        return [self._sp.encode(text)[: TEXT_LEN - 1] + [self.eos_id] for text in texts]


@dataclasses.dataclass
class PromptEmbeds:
    """Encoder outputs trimmed to their real length (eos included), as upstream's T5EncoderModel returns."""

    context: torch.Tensor  # [L, text_dim]
    context_null: torch.Tensor  # [L_neg, text_dim]
    prompt: str
    negative_prompt: str


def pad_tokens(token_lists: List[List[int]], pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ids padded to 512 and their attention mask, as upstream's tokenizer call (padding="max_length")."""
    ids = torch.tensor([tokens + [pad_id] * (TEXT_LEN - len(tokens)) for tokens in token_lists], dtype=torch.long)
    mask = torch.tensor([[1] * len(tokens) + [0] * (TEXT_LEN - len(tokens)) for tokens in token_lists], dtype=torch.long)
    return ids, mask


class PromptEncoder:
    """Texts -> UMT5 embeddings [L, dim] (fp32, CPU): each text alone at its real length (upstream pads each to
    512), recent ones cached."""

    def __init__(self, tokenizer, model, device: torch.device, cache_size: int = CACHED_PROMPTS):
        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.cache_size = cache_size
        self._cache: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

    def _key(self, text: str, device: torch.device) -> tuple:
        return clean_prompt(text), device.type  # the GPU and the CPU round differently

    def missing(self, texts: List[str], device: Optional[torch.device] = None) -> List[str]:
        """The texts that are not cached for `device` (so the caller can leave the encoder where it is)."""
        device = device or self.device
        return [t for t in texts if self._key(t, device) not in self._cache]

    @torch.no_grad()
    def encode(self, texts: List[str], device: Optional[torch.device] = None) -> List[torch.Tensor]:
        device = device or self.device
        keys = [self._key(t, device) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            # each text alone, never batched: its embedding must not depend on what else is encoded with it
            # (a batch changes the matmuls' rounding), so a seed gives the same video whatever the cache holds
            with compute_dtype_for(self.model, device):
                for key, tokens in zip(todo, self.tokenizer.token_lists([k[0] for k in todo])):
                    ids = torch.tensor([tokens], dtype=torch.long, device=device)
                    hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
                    self._cache[key] = hidden.float().cpu()
        for key in keys:
            self._cache.move_to_end(key)
        found = [self._cache[k] for k in keys]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return found

    def token_ids(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_tokens(self.tokenizer.token_lists([clean_prompt(text)]))
        return ids[0], mask[0]


# oneDNN's CPU ISA levels (`ONEDNN_MAX_CPU_ISA` values), lowest first; names on one line are aliases of one level
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
               "AVX10_1_512 AVX512_CORE_FP16", "AVX10_1_512_AMX AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16 AVX512_CORE_AMX_FP16")
ONEDNN_ISA_LEVEL = {name: level for level, names in enumerate(ONEDNN_ISAS) for name in names.split()}
# the CPU's native bf16 matmul instructions and the least oneDNN ISA level that uses each
BF16_MATMUL_ISA = {"amx_bf16": "AVX10_1_512_AMX", "avx512_bf16": "AVX512_CORE_BF16"}


def cpu_bf16_instructions() -> set:
    """Which of BF16_MATMUL_ISA this CPU has: torch's own detection (cpuinfo) where it has one, else /proc/cpuinfo."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return {flag for flag in BF16_MATMUL_ISA if capabilities().get(flag)}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return set(flags) & set(BF16_MATMUL_ISA)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> Tuple[bool, str]:
    """(whether oneDNN, torch's CPU matmuls, can run bf16 on this CPU's native bf16 instructions, why): AMX-BF16 or
    AVX512-BF16, not capped away by `ONEDNN_MAX_CPU_ISA` (or the older `DNNL_MAX_CPU_ISA`). Without them oneDNN emulates
    bf16 matmuls with fp32 instructions: bf16 compute then only adds rounding, and on most such CPUs it is several
    times slower. Decided from what the CPU and oneDNN support, never from a timing; once per process."""
    have = sorted(cpu_bf16_instructions())
    var = next((v for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if os.environ.get(v, "").strip()), None)
    cap = os.environ[var].strip().upper() if var else "DEFAULT"
    if not have:
        fast, why = False, "this CPU has no native bf16 matmul instructions (neither amx_bf16 nor avx512_bf16)"
    elif cap not in ONEDNN_ISA_LEVEL:  # DEFAULT, ALL, or a name oneDNN does not know and so ignores
        fast, why = True, f"this CPU has {' and '.join(have)} and oneDNN's ISA is not capped"
    else:
        usable = [f for f in have if ONEDNN_ISA_LEVEL[cap] >= ONEDNN_ISA_LEVEL[BF16_MATMUL_ISA[f]]]
        fast = bool(usable)
        why = f"this CPU has {' and '.join(have)}; {var}={cap} " + (
            f"lets oneDNN use {' and '.join(usable)}" if usable else
            "keeps oneDNN below " + " and ".join(f"{BF16_MATMUL_ISA[f]} ({f})" for f in have))
    log.info("Wan22 text encoder on the CPU: %s, so it computes in %s", why, "bf16" if fast else "fp32 over the bf16 weights")
    return fast, why


def compute_dtype_for(model: torch.nn.Module, device: torch.device):
    """fp32 compute over 16-bit weights on a CPU without native bf16 matmuls (and always over fp16 weights on a CPU),
    else the weights' dtype."""
    storage = next(model.parameters()).dtype
    if device.type == "cpu" and storage in (torch.bfloat16, torch.float16) and (storage == torch.float16 or not cpu_has_fast_bf16()[0]):
        return computing_in(model, torch.float32)
    return contextlib.nullcontext()


CAST_CHUNK_ELEMENTS = 1 << 22  # weight elements cast at a time (16 MiB in fp32), in whole 64-row tiles


def _linear_computing_in(linear: torch.nn.Linear, dtype: torch.dtype):
    """`linear`'s forward in `dtype` over its stored weight, cast a slice of output rows at a time: casting a whole
    16-bit weight first costs about as much memory traffic as the matmul itself."""
    rows = max(64, CAST_CHUNK_ELEMENTS // linear.in_features // 64 * 64)  # a ragged slice runs ~10 % slower

    def forward(x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = x.to(dtype), linear.weight, linear.bias
        if weight.dtype == dtype:
            return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
        out = x.new_empty(*x.shape[:-1], linear.out_features)
        for first in range(0, linear.out_features, rows):
            part = slice(first, first + rows)
            out[..., part] = torch.nn.functional.linear(x, weight[part].to(dtype), None if bias is None else bias[part].to(dtype))
        return out

    return forward


def _gated_ff_forward(ff: torch.nn.Module):
    """transformers' UMT5DenseGatedActDense.forward without its cast of the activations to `wo`'s stored dtype."""
    return lambda hidden: ff.wo(ff.dropout(ff.act(ff.wi_0(hidden)) * ff.wi_1(hidden)))


@contextlib.contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """Run a UMT5 encoder in `dtype` with its weights stored as they are: each projection casts its weight slice by
    slice as it runs; the norms and position biases (a few MB) are cast for the call; the embedding lookup's rows
    are cast after it."""
    encoder = getattr(model, "encoder", model)
    linears = [m for m in encoder.modules() if type(m) is torch.nn.Linear]  # a subclass (fp8) keeps its forward
    gated_ffs = [m for m in encoder.modules() if all(hasattr(m, name) for name in ("wi_0", "wi_1", "wo"))]
    small = [p for m in encoder.modules() if not isinstance(m, torch.nn.Linear) and m is not encoder.embed_tokens
             for p in m.parameters(recurse=False)]
    stored = [(p, p.data) for p in small]
    handle = encoder.embed_tokens.register_forward_hook(lambda module, args, output: output.to(dtype))
    try:
        for p, data in stored:
            p.data = data.to(dtype)
        for linear in linears:
            linear.forward = _linear_computing_in(linear, dtype)
        for ff in gated_ffs:
            ff.forward = _gated_ff_forward(ff)
        yield
    finally:
        handle.remove()
        for module in linears + gated_ffs:
            module.__dict__.pop("forward", None)
        for p, data in stored:
            p.data = data


def pad_context(contexts: List[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Zero-pad each [L, dim] context to [length, dim] (upstream pads before text_embedding, no mask)."""
    return torch.stack([torch.cat([c, c.new_zeros(length - c.shape[0], c.shape[1])]) for c in contexts])
