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

    def __call__(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self._tokenizer(
            texts, padding="max_length", truncation=True, max_length=TEXT_LEN,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return out.input_ids, out.attention_mask


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

    def __call__(self, texts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), TEXT_LEN), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), TEXT_LEN), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self._sp.encode(text)[: TEXT_LEN - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


@dataclasses.dataclass
class PromptEmbeds:
    """Encoder outputs trimmed to their real length (eos included), as upstream's T5EncoderModel returns."""

    context: torch.Tensor  # [L, text_dim]
    context_null: torch.Tensor  # [L_neg, text_dim]
    prompt: str
    negative_prompt: str


class PromptEncoder:
    def __init__(self, tokenizer, model, device: torch.device):
        self.tokenizer, self.model, self.device = tokenizer, model, device

    @torch.no_grad()
    def encode(self, texts: List[str], device: Optional[torch.device] = None) -> List[torch.Tensor]:
        device = device or self.device
        ids, mask = self.tokenizer([clean_prompt(t) for t in texts])
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        return [h[:n] for h, n in zip(hidden, lengths.tolist())]

    def token_ids(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer([clean_prompt(text)])
        return ids[0], mask[0]


def pad_context(contexts: List[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Zero-pad each [L, dim] context to [length, dim] (upstream pads before text_embedding, no mask)."""
    return torch.stack([torch.cat([c, c.new_zeros(length - c.shape[0], c.shape[1])]) for c in contexts])
