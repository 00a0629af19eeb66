"""What the pack's web extension (``web/``) reads from ComfyUI's server, and the per-step charts the nodes send.

- ``POST /direct_inversion/p2p_alignment`` with ``{"source": str, "target": str, "tokenizer": "sd1"|"sd2"|"sdxl"}``
  answers how the P2P Editor will see the prompts: each prompt's words with their token positions (from ComfyUI's
  own tokenizers, with the editor's word splitting), the mode ``auto`` picks, and a word-level alignment (same /
  replaced / inserted / deleted) from the editor's own alignment code (word swap for equal word counts, the
  refine token alignment otherwise). Bad JSON, missing or oversized fields, unknown tokenizer names and prompts
  the editor would refuse get a 4xx answer with ``{"error": message}``.
- :func:`chart` builds the ``direct_inversion_chart`` UI message the extension draws on Invert and the sampler.
"""
from __future__ import annotations

import json
import math
from typing import Optional

from ..adapters.comfyui_prompts import tokenized_prompt_with
from ..editors.p2p_alignment import _global_align, auto_mode

__all__ = ["MAX_PROMPT_CHARS", "ROUTE", "TOKENIZERS", "alignment", "chart", "register"]

ROUTE = "/direct_inversion/p2p_alignment"
MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024
TOKENIZERS = ("sd1", "sd2", "sdxl")
_tokenizers: dict = {}


def tokenizer(name: str):
    """ComfyUI's tokenizer of a model family (its vocabulary files ship with ComfyUI; no weights), cached."""
    if name not in _tokenizers:
        if name == "sd1":
            from comfy.sd1_clip import SD1Tokenizer as cls
        elif name == "sd2":
            from comfy.text_encoders.sd2_clip import SD2Tokenizer as cls
        elif name == "sdxl":
            from comfy.sdxl_clip import SDXLTokenizer as cls
        else:
            raise KeyError(name)
        _tokenizers[name] = cls(embedding_directory=None)
    return _tokenizers[name]


def _word_ops(source, target, mode: str) -> list[dict]:
    """Word-level view of the editor's alignment: one entry per target word (same / replace / insert) and one per
    source word no target word keeps (delete), in target order with deletions where they fall."""
    if mode == "replace":
        return [{"op": "same" if s.lower() == t.lower() else "replace", "source": i, "target": i}
                for i, (s, t) in enumerate(zip(source.words, target.words))]
    aligned = _global_align(source.ids, target.ids)  # target token -> source token or -1, as refine maps them
    token_word = {p: w for w, span in enumerate(source.spans) for p in span}
    ops, kept = [], set()
    for j, span in enumerate(target.spans):
        matches = {token_word.get(aligned[p]) for p in span if aligned[p] >= 0}
        matches.discard(None)
        if len(matches) == 1 and all(aligned[p] >= 0 for p in span):
            i = matches.pop()
            ops.append({"op": "same", "source": i, "target": j})
            kept.add(i)
        else:
            ops.append({"op": "insert", "source": None, "target": j})
    out, previous = [], -1
    for entry in ops:
        if entry["source"] is not None:
            out += [{"op": "delete", "source": i, "target": None} for i in range(previous + 1, entry["source"])
                    if i not in kept]
            previous = entry["source"]
        out.append(entry)
    out += [{"op": "delete", "source": i, "target": None} for i in range(previous + 1, len(source.words))
            if i not in kept]
    return out


def alignment(tokenize, source_text: str, target_text: str) -> dict:
    source = tokenized_prompt_with(tokenize, source_text, "source").prompt
    target = tokenized_prompt_with(tokenize, target_text, "target").prompt
    mode = auto_mode(source, target)

    def words(prompt):
        return [{"word": w, "positions": list(span)} for w, span in zip(prompt.words, prompt.spans)]

    return {"source": words(source), "target": words(target), "auto_mode": mode, "alignment": _word_ops(source, target, mode)}


def _bad(web, status: int, message: str):
    return web.json_response({"error": message}, status=status)


async def p2p_alignment(request):
    from aiohttp import web

    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _bad(web, 413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        return _bad(web, 413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _bad(web, 400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return _bad(web, 400, "The request body must be a JSON object with source, target and tokenizer.")
    fields = {}
    for name in ("source", "target"):
        value = body.get(name)
        if not isinstance(value, str):
            return _bad(web, 400, f"'{name}' must be a string (the {name} prompt).")
        if len(value) > MAX_PROMPT_CHARS:
            return _bad(web, 413, f"The {name} prompt has {len(value)} characters; at most {MAX_PROMPT_CHARS}.")
        fields[name] = value
    name = body.get("tokenizer", "sd1")
    if name not in TOKENIZERS:
        return _bad(web, 400, f"Unknown tokenizer {name!r}; one of {', '.join(TOKENIZERS)}.")
    try:
        answer = alignment(tokenizer(name).tokenize_with_weights, fields["source"], fields["target"])
    except ValueError as e:
        return _bad(web, 422, str(e))
    return web.json_response({"tokenizer": name, **answer})


def register(routes) -> None:
    """Add the pack's routes to ComfyUI's server route table."""
    routes.post(ROUTE)(p2p_alignment)


def _rms(x) -> float:
    return float(x.float().pow(2).mean().sqrt())


def chart(title: str, series: dict, steps: Optional[int] = None) -> dict:
    """The UI message the web extension draws: ``{"direct_inversion_chart": [{"title", "steps", "series": {name:
    [values]}}]}`` (NaN/inf become null)."""
    clean = {name: [None if v is None or not math.isfinite(v) else float(v) for v in values]
             for name, values in series.items() if values}
    length = steps if steps is not None else max((len(v) for v in clean.values()), default=0)
    return {"direct_inversion_chart": [{"title": title, "steps": length, "series": clean}]}
