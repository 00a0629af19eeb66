"""The SD1 (OpenAI CLIP ViT-L/14) byte-pair tokenizer, so Prompt-to-Prompt's word alignment runs on real tokens.

The merge table ``clip_merges.txt.gz`` is OpenAI CLIP's BPE vocabulary (MIT licence), the same 48,894 merges that
SD1's ``tokenizer/merges.txt`` holds. The vocabulary is built from it as CLIP builds it: the 256 byte symbols, the
same with the end-of-word mark, one entry per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
Text is cleaned as CLIP cleans it for plain ASCII captions (HTML entities, runs of whitespace, lower case);
``tests/test_toy_model.py`` checks the ids against ComfyUI's SD1 tokenizer where ComfyUI is installed.
"""
from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

MERGES = Path(__file__).with_name("clip_merges.txt.gz")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def _byte_symbols() -> dict:
    """CLIP's reversible map from bytes to printable unicode symbols (whitespace/control bytes moved past 255)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols = {byte: chr(byte) for byte in printable}  # CLIP's order: printable bytes first, then the rest
    for extra, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + extra)
    return symbols


def _word_pattern():
    try:
        import regex
    except ImportError as error:  # diffusers and ComfyUI's transformers both install it
        raise ImportError("The toy model's tokenizer needs the 'regex' package (pip install regex).") from error
    return regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                         r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class ClipTokenizer:
    """``ids(text)``: token ids without specials; ``__call__(texts)``: padded ``[B, 77]`` windows as SD1 builds them
    (start token, the ids, end token, padded with the end token; truncated to keep the end token)."""

    def __init__(self, merges_path: Path = MERGES):
        with gzip.open(merges_path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        if not lines[0].startswith("#version"):
            raise ValueError(f"{merges_path} is not a BPE merge table (no '#version' header)")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token_id, self.eos_token_id = self.encoder[BOS], self.encoder[EOS]
        self.vocab_size = len(vocab)
        self._pattern = _word_pattern()
        self._cache = {BOS: BOS, EOS: EOS}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self._cache[token] = out
        return out

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def ids(self, text: str) -> list[int]:
        symbols = _byte_symbols()
        out = []
        for word in self._pattern.findall(self.clean(text)):
            word = "".join(symbols[b] for b in word.encode("utf-8"))
            out.extend(self.encoder[piece] for piece in self._bpe(word).split(" "))
        return out

    def window(self, text: str, length: int = CONTEXT_LENGTH) -> list[int]:
        ids = [self.bos_token_id] + self.ids(text)[: length - 2] + [self.eos_token_id]
        return ids + [self.eos_token_id] * (length - len(ids))

    def __call__(self, texts: Sequence[str] | str, length: int = CONTEXT_LENGTH):
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([self.window(text, length) for text in texts], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        symbols = _byte_symbols()
        inverse = {v: k for k, v in symbols.items()}
        text = "".join(self.decoder[int(i)] for i in ids).replace("</w>", symbols[ord(" ")])
        return bytearray(inverse[c] for c in text).decode("utf-8", errors="replace").strip()


@lru_cache(maxsize=1)
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()
