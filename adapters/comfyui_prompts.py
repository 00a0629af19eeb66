"""Prompts for editors through a ComfyUI CLIP: word-by-word token positions from the CLIP's own tokenizer(s), and
the conditioning encoded from the very tokens that were aligned.

Every text encoder of the CLIP (SD1.x: ``l``; SDXL: ``g`` and ``l``; SD3: ``l``, ``g``, ``t5xxl``; Flux: ``l``,
``t5xxl``) tokenises the prompt; each word is tokenised alone with the same tokenizer, and the words' tokens, framed
by the encoder's start (CLIP) and end tokens, must reproduce the prompt's tokens exactly (otherwise ComfyUI's prompt
syntax, such as ``(word:1.2)`` spanning several words or embeddings, changed the tokens, and positions would be
wrong). The CLIP encoders must agree on the positions, since their outputs are concatenated per token; T5's
positions are kept per encoder (SD3 and Flux read its states as tokens of their own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..editors.p2p_alignment import TokenizedPrompt, tokenize_words
from ..editors.p2p_zero import edit_direction

__all__ = ["EncodablePrompt", "directed_conditioning", "encoder_prompts", "tokenized_prompt", "tokenized_prompt_with"]

# tokenizer key -> the attribute of ComfyUI's text-encoder model holding that encoder (None when the CLIP lacks it)
_ENCODER_MODELS = {"l": "clip_l", "g": "clip_g", "t5xxl": "t5xxl"}


@dataclass
class EncodablePrompt:
    prompt: TokenizedPrompt  # the positions shared by the CLIP encoders (T5's alone if the CLIP has no other)
    tokens: dict  # the CLIP tokenizer's output for the whole prompt
    window: int  # tokens per window of the encoders of ``prompt`` (77)
    encoders: dict = field(default_factory=dict)  # tokenizer key ("l", "g", "t5xxl") -> (TokenizedPrompt, window)

    def encode(self, clip) -> list:
        return clip.encode_from_tokens_scheduled(self.tokens)


def _ids(chunk) -> list[int]:
    return [int(t[0]) for t in chunk]


def _frame(key: str, empty: list[int], one_word: list[int]) -> tuple[Optional[int], int]:
    """(start token or None, end token) of an encoder, from its tokens of "" and of one word: CLIP frames prompts with
    a start and an end token, T5 ends them only."""
    if not empty or not one_word:
        raise ValueError(f"The text encoder {key!r} frames prompts without an end token; Prompt-to-Prompt cannot place "
                         f"words in its tokens.")
    if empty[0] == one_word[0]:
        if len(empty) < 2:
            raise ValueError(f"The text encoder {key!r} frames prompts without an end token; Prompt-to-Prompt cannot "
                             f"place words in its tokens.")
        return empty[0], empty[1]
    return None, empty[0]


def _separate(key: str) -> bool:
    """Encoders whose positions may differ from the CLIP encoders' (T5's sentencepiece tokens)."""
    return key.startswith(("t5", "umt5"))


def tokenized_prompt_with(tokenize, text: str, name: str = "source") -> EncodablePrompt:
    """Token positions of ``text`` under ``tokenize`` (a ComfyUI ``tokenize_with_weights``), per text encoder."""
    full, empty, probe = tokenize(text), tokenize(""), tokenize("a")
    encoders = {}
    for key, chunks in full.items():
        if len(chunks) != 1:
            raise ValueError(f"The {name} prompt {text!r} does not fit the text encoder's window of "
                             f"{len(empty[key][0])} tokens; shorten it for Prompt-to-Prompt.")
        ids = _ids(chunks[0])
        start, end = _frame(key, _ids(empty[key][0]), _ids(probe[key][0]))
        skip = 0 if start is None else 1

        def pieces(word: str) -> list[int]:
            word_ids = _ids(tokenize(word)[key][0])[skip:]
            return word_ids[:word_ids.index(end)] if end in word_ids else word_ids

        prompt = tokenize_words(text, pieces, start, end, max_len=len(ids))
        if list(prompt.ids) != ids[:len(prompt.ids)]:
            raise ValueError(f"The {name} prompt's words could not be matched to its tokens (encoder {key!r}); "
                             "Prompt-to-Prompt needs plain words: remove weights such as (word:1.2) spanning "
                             "several words and embeddings.")
        encoders[key] = (prompt, len(ids))
    if not encoders:
        raise ValueError("The CLIP's tokenizer returned no tokens.")
    shared = [key for key in encoders if not _separate(key)] or list(encoders)[:1]
    result, window = encoders[shared[0]]
    if any(encoders[key][0].spans != result.spans for key in shared):
        raise ValueError(f"The text encoders split the {name} prompt into different tokens; cannot align it.")
    return EncodablePrompt(prompt=result, tokens=full, window=window, encoders=encoders)


def encoder_prompts(clip, source: EncodablePrompt, target: EncodablePrompt) -> list[tuple]:
    """P2P's per-encoder prompts ``(key, source, target, window)`` of the text encoders the CLIP has (ComfyUI's SD3
    tokenizer tokenises for CLIP-L, CLIP-G and T5 whichever of them are loaded). Both prompts must make as many tokens
    per encoder (T5 pads to a minimum, 77 on SD3 and 256 on Flux, and grows beyond it)."""
    model = getattr(clip, "cond_stage_model", None)
    out = []
    for key, (prompt, window) in source.encoders.items():
        attribute = _ENCODER_MODELS.get(key)
        if attribute is not None and model is not None and hasattr(model, attribute) and getattr(model, attribute) is None:
            continue  # tokenised, but not encoded: no tokens of it in the conditioning
        if key not in target.encoders:
            continue
        other, other_window = target.encoders[key]
        if other_window != window:
            raise ValueError(f"The source prompt makes {window} and the target prompt {other_window} tokens of the "
                             f"{key} text encoder; Prompt-to-Prompt needs the same number: shorten the longer prompt "
                             f"to fit the encoder's minimum ({min(window, other_window)} tokens).")
        out.append((key, prompt, other, window))
    return out


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
