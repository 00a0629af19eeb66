"""Prompts for editors through a ComfyUI CLIP: word-by-word token positions from the CLIP's own tokenizer(s), and
the conditioning encoded from the very tokens that were aligned.

Every text encoder of the CLIP (SD1.x: ``l``; SDXL: ``g`` and ``l``) tokenises the prompt; each word is tokenised
alone with the same tokenizer, and the words' tokens, framed by the encoder's start and end tokens, must reproduce
the prompt's tokens exactly (otherwise ComfyUI's prompt syntax, such as ``(word:1.2)`` spanning several words or
embeddings, changed the tokens, and positions would be wrong). All encoders must agree on the positions, since
their outputs are concatenated per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..editors.p2p_alignment import TokenizedPrompt, tokenize_words
from ..editors.p2p_zero import edit_direction

__all__ = ["EncodablePrompt", "directed_conditioning", "tokenized_prompt", "tokenized_prompt_with"]


@dataclass
class EncodablePrompt:
    prompt: TokenizedPrompt
    tokens: dict  # the CLIP tokenizer's output for the whole prompt
    window: int  # tokens per encoder window (77)

    def encode(self, clip) -> list:
        return clip.encode_from_tokens_scheduled(self.tokens)


def _ids(chunk) -> list[int]:
    return [int(t[0]) for t in chunk]


def tokenized_prompt_with(tokenize, text: str, name: str = "source") -> EncodablePrompt:
    """Token positions of ``text`` under ``tokenize`` (a ComfyUI ``tokenize_with_weights``)."""
    full, empty = tokenize(text), tokenize("")
    result, window = None, None
    for key, chunks in full.items():
        if len(chunks) != 1:
            raise ValueError(f"The {name} prompt {text!r} does not fit the text encoder's window of "
                             f"{len(empty[key][0])} tokens; shorten it for Prompt-to-Prompt.")
        ids = _ids(chunks[0])
        window = len(ids)
        start, end = _ids(empty[key][0])[:2]

        def pieces(word: str) -> list[int]:
            word_ids = _ids(tokenize(word)[key][0])
            return word_ids[1:word_ids.index(end, 1)] if end in word_ids[1:] else word_ids[1:]

        prompt = tokenize_words(text, pieces, start, end, max_len=window)
        if list(prompt.ids) != ids[:len(prompt.ids)]:
            raise ValueError(f"The {name} prompt's words could not be matched to its tokens (encoder {key!r}); "
                             "Prompt-to-Prompt needs plain words: remove weights such as (word:1.2) spanning "
                             "several words and embeddings.")
        if result is not None and result.spans != prompt.spans:
            raise ValueError(f"The text encoders split the {name} prompt into different tokens; cannot align it.")
        result = prompt
    if result is None:
        raise ValueError("The CLIP's tokenizer returned no tokens.")
    return EncodablePrompt(prompt=result, tokens=full, window=window)


def tokenized_prompt(clip, text: str, name: str = "source") -> EncodablePrompt:
    """:func:`tokenized_prompt_with` the CLIP's tokenizer."""
    return tokenized_prompt_with(clip.tokenize, text, name)


def directed_conditioning(source: list, source_sentences: Sequence[list], target_sentences: Sequence[list]) -> list:
    """Pix2Pix-Zero's edited conditioning: every entry of the ``source`` CONDITIONING with the edit direction
    Delta = mean(target sentences) - mean(source sentences) added to its per-token embeddings and, where all have
    one (SDXL), to its pooled output. The sentences are CONDITIONINGs of one entry each (their first is used)."""
    first = lambda conds, key: [c[0][0] if key is None else c[0][1].get(key) for c in conds]  # noqa: E731
    delta = edit_direction(first(source_sentences, None), first(target_sentences, None))
    pooled = first(source_sentences, "pooled_output") + first(target_sentences, "pooled_output")
    pooled_delta = None
    if all(p is not None for p in pooled):
        pooled_delta = edit_direction(first(source_sentences, "pooled_output"), first(target_sentences, "pooled_output"))
    out = []
    for embeds, options in source:
        if embeds.shape[1:] != delta.shape[1:]:
            raise ValueError(f"The source prompt encodes to {embeds.shape[1]} tokens but the edit direction's sentences "
                             f"to {delta.shape[1]}: keep the source prompt and every sentence within the text encoder's "
                             f"window (75 tokens).")
        options = dict(options)
        if pooled_delta is not None and options.get("pooled_output") is not None:
            options["pooled_output"] = options["pooled_output"] + pooled_delta.to(options["pooled_output"])
        out.append([embeds + delta.to(embeds), options])
    return out
