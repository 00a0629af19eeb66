"""Prompt-to-Prompt token alignment (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control";
reference: google/prompt-to-prompt ``seq_aligner.py``), over any tokenizer.

A prompt is tokenised word by word (words are separated by spaces, as the reference splits them); token positions
count the start token, so the first word's first token is at position 1, as in the encoder's output (0 for an encoder
without one, such as T5).

- replace (same number of words): each target token takes the map of the source token(s) of the same word;
  a changed word made of a different number of tokens spreads its source word's map evenly over its tokens.
- refine (words inserted, deleted or changed freely): a global alignment (Needleman-Wunsch, gap 0, match 1,
  mismatch -1) of the two token sequences; target tokens aligned to an identical source token take its map,
  the others keep their own (alpha 0).
- equalizer (reweight) and blend words: per-token values and positions of chosen words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["TokenizedPrompt", "auto_mode", "equalizer", "refinement_mapper", "replacement_mapper", "tokenize_words",
           "word_positions"]

Tokenize = Callable[[str], Sequence[int]]  # token ids of a text, without start/end tokens


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt's words and token ids. ``ids`` includes the start and end tokens; ``spans[w]`` are the positions of
    word w's tokens in ``ids``."""

    text: str
    words: tuple
    ids: tuple
    spans: tuple

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_words(text: str, tokenize: Tokenize, start: Optional[int], end: int, max_len: int = 77) -> TokenizedPrompt:
    """Tokenise ``text`` word by word with ``tokenize`` (ids without start/end), framing it with ``start`` (None:
    the encoder has no start token, as T5) and ``end``."""
    words = tuple(text.split())
    ids, spans = ([] if start is None else [start]), []
    for word in words:
        pieces = list(tokenize(word))
        spans.append(tuple(range(len(ids), len(ids) + len(pieces))))
        ids += pieces
    ids.append(end)
    if len(ids) > max_len:
        raise ValueError(f"The prompt {text!r} has {len(ids)} tokens but the text encoder's window is {max_len}; "
                         "shorten it for Prompt-to-Prompt.")
    return TokenizedPrompt(text=text, words=words, ids=tuple(ids), spans=tuple(spans))


def _plain(word: str) -> str:
    """A word as matched against a prompt's words: lower case, without surrounding punctuation ("Bench," ~ "bench")."""
    return word.strip(PUNCTUATION).lower()


PUNCTUATION = ",.;:!?\"'()[]"


def word_positions(prompt: TokenizedPrompt, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` (a word of the prompt, or a space-separated phrase of words;
    case and surrounding punctuation are ignored)."""
    wanted = [_plain(w) for w in word.split()]
    words = [_plain(w) for w in prompt.words]
    found = []
    for w in range(len(words) - len(wanted) + 1):
        if wanted and words[w:w + len(wanted)] == wanted:
            for k in range(len(wanted)):
                found += prompt.spans[w + k]
    if not found:
        raise ValueError(f"{word!r} is not a word of the prompt {prompt.text!r} (its words: {', '.join(prompt.words)}).")
    return found


def auto_mode(source: TokenizedPrompt, target: TokenizedPrompt) -> str:
    """``replace`` when the prompts have the same number of words, otherwise ``refine`` (the reference's choice)."""
    return "replace" if len(source.words) == len(target.words) else "refine"


def replacement_mapper(source: TokenizedPrompt, target: TokenizedPrompt, max_len: int = 77) -> torch.Tensor:
    """``[max_len, max_len]`` M with target map t = sum_s M[s, t] * source map s (the reference's replacement mapper).

    Words that differ map their tokens all-to-all with weight 1 / (target tokens) (one to one when the counts agree);
    every other token, padding included, maps to its counterpart, shifted by the token-count changes before it.
    """
    if len(source.words) != len(target.words):
        raise ValueError(f"replace needs prompts with the same number of words, but the source has {len(source.words)} "
                         f"and the target {len(target.words)}; use refine (or mode auto) for inserted or deleted words.")
    mapper = torch.zeros(max_len, max_len)
    i = j = 0
    changed = {w for w in range(len(source.words)) if source.words[w] != target.words[w]}
    for w in range(len(source.words)):
        s_span, t_span = source.spans[w], target.spans[w]
        while i < s_span[0]:  # tokens before this word (the start token)
            mapper[i, j] = 1.0
            i += 1
            j += 1
        if w in changed and len(s_span) != len(t_span):
            for s in s_span:
                mapper[s, list(t_span)] = 1.0 / len(t_span)
        else:
            for s, t in zip(s_span, t_span):
                mapper[s, t] = 1.0
        i, j = s_span[-1] + 1, t_span[-1] + 1
    while i < max_len and j < max_len:  # end token and padding
        mapper[i, j] = 1.0
        i += 1
        j += 1
    return mapper


def _global_align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each position of y, the aligned position of x, or -1 (Needleman-Wunsch, gap 0, match 1, mismatch -1,
    ties broken as the reference: insertion, then deletion, then (mis)match)."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else (2 if best == up else 3)
    mapping = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return mapping


def refinement_mapper(source: TokenizedPrompt, target: TokenizedPrompt,
                      max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mapper, alphas)``, each ``[max_len]``: target position p takes source position ``mapper[p]``'s map with
    weight ``alphas[p]`` (1 for tokens aligned to an identical source token, 0 for new ones) and keeps its own map
    with weight 1 - alphas[p]. Padding positions map to the source's padding."""
    aligned = _global_align(source.ids, target.ids)
    mapper = torch.zeros(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    for p, s in enumerate(aligned):
        # with a zero gap penalty a mismatch never beats two gaps, so every aligned pair is an identical token
        mapper[p] = max(s, 0)
        alphas[p] = 1.0 if s >= 0 else 0.0
    for k, p in enumerate(range(len(target), max_len)):
        mapper[p] = min(len(source) + k, max_len - 1)
    return mapper, alphas


def equalizer(prompt: TokenizedPrompt, words: Sequence[str], values: Sequence[float], max_len: int = 77) -> torch.Tensor:
    """``[max_len]`` per-token attention scales: ``values[k]`` on the tokens of ``words[k]``, 1 elsewhere."""
    if len(words) != len(values):
        raise ValueError(f"reweight needs one value per word: {len(words)} words, {len(values)} values.")
    scale = torch.ones(max_len)
    for word, value in zip(words, values):
        scale[word_positions(prompt, word)] = float(value)
    return scale
