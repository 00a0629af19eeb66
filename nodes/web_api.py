"""What the pack's web extension (``web/``) reads from ComfyUI's server, and the per-step charts the nodes send.

- ``POST /direct_inversion/p2p_alignment`` with ``{"source": str, "target": str, "tokenizer": "sd1"|"sd2"|"sdxl"}``
  answers how the P2P Editor will see the prompts: each prompt's words with their token positions (from ComfyUI's
  own tokenizers, with the editor's word splitting), the mode ``auto`` picks, and a word-level alignment (same /
  replaced / inserted / deleted) from the editor's own alignment code (word swap for equal word counts, the
  refine token alignment otherwise).

  Every request it refuses gets a 4xx answer with ``{"error": message}`` (never a 5xx, nor a traceback in the
  log): 413 for a body over ``MAX_BODY_BYTES`` or a prompt over ``MAX_PROMPT_CHARS``; 400 for a body that is not
  JSON, nests arrays and objects over ``MAX_JSON_DEPTH`` deep, or is not an object of two prompts of valid Unicode
  text (no lone surrogates) and a known tokenizer; 422 for prompts the editor would refuse or whose weights
  ``(word:1.2)`` nest over ``MAX_PROMPT_NESTING`` deep; 429 while ``MAX_PENDING`` requests are already waiting.
  Only a failure of the server itself is a 500, also answered as ``{"error": message}``. :func:`answer` computes
  an answer from the raw body, with no server around it; :class:`AlignmentRoute` runs it on a worker thread, off
  ComfyUI's event loop.
- :func:`chart` builds the ``direct_inversion_chart`` UI message the extension draws on Invert and the sampler.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import reprlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ..adapters.comfyui_prompts import tokenized_prompt_with
from ..editors.p2p_alignment import _global_align, auto_mode

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "MAX_PENDING", "MAX_PROMPT_CHARS", "MAX_PROMPT_NESTING", "ROUTE",
           "TOKENIZERS", "AlignmentRequest", "AlignmentRoute", "RequestError", "alignment", "answer", "chart",
           "parse_request", "register"]

log = logging.getLogger("DirectInversion")

ROUTE = "/direct_inversion/p2p_alignment"
MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32  # the request is one object of strings; other keys may nest this deep
MAX_PROMPT_NESTING = 32  # parentheses (ComfyUI's prompt weights); its parser recurses, and takes depth^2 time
MAX_PENDING = 16  # alignment requests waiting for or running on the worker thread; more are answered 429
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


@dataclass(frozen=True)
class AlignmentRequest:
    """A request the route accepts: two prompts (valid Unicode, at most ``MAX_PROMPT_CHARS`` each) and a tokenizer."""

    source: str
    target: str
    tokenizer: str


class RequestError(ValueError):
    """A request the route refuses: the 4xx status and the message it answers with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON allows lone surrogates; UTF-8 and the tokenizers do not
_JSON_SYNTAX = re.compile(r'[\[\]{}"\\]')
_PARENTHESES = re.compile(r"(?<!\\)[()]")  # as ComfyUI reads them: \( and \) are plain characters
_FIELDS = "The request body must be a JSON object with source, target and tokenizer."


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings do not count), which is how deep
    ``json.loads`` recurses into it."""
    depth = deepest = 0
    in_string, escaped = False, -1
    for match in _JSON_SYNTAX.finditer(text):
        i, c = match.start(), match.group()
        if i == escaped:
            continue
        if in_string:
            if c == "\\":
                escaped = i + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _prompt_nesting(text: str) -> int:
    """How deep ComfyUI's prompt weights ``(word:1.2)`` nest in a prompt, as its ``parse_parentheses`` counts."""
    depth = deepest = 0
    for match in _PARENTHESES.finditer(text):
        depth += 1 if match.group() == "(" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_request(raw: bytes) -> AlignmentRequest:
    """The route's request from its raw body; :class:`RequestError` (400, 413, or 422 for a prompt nesting weights
    too deep) for a body it refuses."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads(raw) decodes it
    except UnicodeDecodeError:
        raise RequestError(400, "The request body is not valid JSON.") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise RequestError(400, f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} deep. "
                                + _FIELDS)
    try:
        body = json.loads(text)
    except ValueError:  # also integers of more digits than Python converts
        raise RequestError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError(400, _FIELDS)
    fields = {}
    for name in ("source", "target"):
        value = body.get(name)
        if not isinstance(value, str):
            raise RequestError(400, f"'{name}' must be a string (the {name} prompt).")
        if len(value) > MAX_PROMPT_CHARS:
            raise RequestError(413, f"The {name} prompt has {len(value)} characters; at most {MAX_PROMPT_CHARS}.")
        bad = _SURROGATE.search(value)
        if bad is not None:
            raise RequestError(400, f"The {name} prompt is not valid text: character {bad.start()} is a lone "
                                    f"surrogate (U+{ord(bad.group()):04X}); send the prompt as Unicode text.")
        nesting = _prompt_nesting(value)
        if nesting > MAX_PROMPT_NESTING:
            raise RequestError(422, f"The {name} prompt nests parentheses {nesting} deep; at most "
                                    f"{MAX_PROMPT_NESTING} for Prompt-to-Prompt.")
        fields[name] = value
    name = body.get("tokenizer", "sd1")
    if not isinstance(name, str):
        raise RequestError(400, f"'tokenizer' must be a string, one of {', '.join(TOKENIZERS)}.")
    if name not in TOKENIZERS:
        raise RequestError(400, f"Unknown tokenizer {reprlib.repr(name)}; one of {', '.join(TOKENIZERS)}.")
    return AlignmentRequest(source=fields["source"], target=fields["target"], tokenizer=name)


def answer(raw: bytes) -> tuple[int, dict]:
    """The route's answer to a raw request body: ``(200, alignment)``, or a 4xx status with ``{"error": message}``
    for every request it refuses (400/413 from :func:`parse_request`, 422 for prompts the editor would refuse).
    Only a failure of the server itself (ComfyUI's tokenizer missing) raises."""
    try:
        request = parse_request(raw)
    except RequestError as e:
        return e.status, {"error": str(e)}
    tokenize = tokenizer(request.tokenizer).tokenize_with_weights
    try:
        return 200, {"tokenizer": request.tokenizer, **alignment(tokenize, request.source, request.target)}
    except ValueError as e:
        return 422, {"error": str(e)}


async def _read_body(request, limit: int) -> bytes:
    """The request body, read until its end or until it is longer than ``limit`` bytes (then ``limit + 1`` bytes)."""
    raw = bytearray()
    while len(raw) <= limit:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)


class AlignmentRoute:
    """The route's handler. A request is answered on one worker thread of its own, off ComfyUI's event loop (one
    thread: the cached tokenizers are never called from two threads at once); at most ``max_pending`` requests wait
    for or run on it, and a request beyond that gets 429 at once, so a flood neither stalls the server's other
    routes nor queues unbounded work. The body is read (at most ``MAX_BODY_BYTES`` + 1 bytes) before a request
    counts as pending, so slow clients cannot hold the places."""

    def __init__(self, max_pending: int = MAX_PENDING):
        self.max_pending = max_pending
        self.pending = 0
        self._executor: Optional[ThreadPoolExecutor] = None

    async def handle(self, request):
        from aiohttp import web

        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response({"error": f"The request body is larger than {MAX_BODY_BYTES} bytes."}, status=413)
        raw = await _read_body(request, MAX_BODY_BYTES)
        if self.pending >= self.max_pending:
            return web.json_response({"error": f"{self.pending} prompt alignments are already waiting; try again "
                                               "in a moment."}, status=429, headers={"Retry-After": "1"})
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="DirectInversion-p2p-alignment")
        self.pending += 1
        try:
            status, body = await asyncio.get_running_loop().run_in_executor(self._executor, answer, raw)
        except Exception as e:  # noqa: BLE001 -- the server's own failure, answered as JSON (the request was valid)
            log.exception("[DirectInversion] the P2P alignment route failed")
            status, body = 500, {"error": f"The server could not align the prompts: {type(e).__name__}: {e}"}
        finally:
            self.pending -= 1
        return web.json_response(body, status=status)


def register(routes) -> None:
    """Add the pack's routes to ComfyUI's server route table."""
    routes.post(ROUTE)(AlignmentRoute().handle)


def _rms(x) -> float:
    return float(x.float().pow(2).mean().sqrt())


def chart(title: str, series: dict, steps: Optional[int] = None) -> dict:
    """The UI message the web extension draws: ``{"direct_inversion_chart": [{"title", "steps", "series": {name:
    [values]}}]}`` (NaN/inf become null)."""
    clean = {name: [None if v is None or not math.isfinite(v) else float(v) for v in values]
             for name, values in series.items() if values}
    length = steps if steps is not None else max((len(v) for v in clean.values()), default=0)
    return {"direct_inversion_chart": [{"title": title, "steps": length, "series": clean}]}
