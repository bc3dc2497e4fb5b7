"""Prompt encoding as upstream: UMT5 ids padded to 512, encoder output trimmed to the real tokens."""
from __future__ import annotations

import dataclasses
import html
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import CheckpointError

TEXT_LEN = 512


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
    def __init__(self, tokenizer, model, device: torch.device):
        self.tokenizer, self.model, self.device = tokenizer, model, device

    @torch.no_grad()
    def encode(self, texts: List[str], device: Optional[torch.device] = None) -> List[torch.Tensor]:
        device = device or self.device
        token_lists = self.tokenizer.token_lists([clean_prompt(t) for t in texts])
        ids, mask = pad_tokens(token_lists)
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return [h[: len(tokens)] for h, tokens in zip(hidden, token_lists)]

    def token_ids(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_tokens(self.tokenizer.token_lists([clean_prompt(text)]))
        return ids[0], mask[0]


def pad_context(contexts: List[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Zero-pad each [L, dim] context to [length, dim] (upstream pads before text_embedding, no mask)."""
    return torch.stack([torch.cat([c, c.new_zeros(length - c.shape[0], c.shape[1])]) for c in contexts])
