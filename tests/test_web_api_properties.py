"""The P2P alignment route's request handling (``nodes/web_api.py``) over random request bodies: random bytes, random
JSON values, deeply nested JSON, bodies around the size cap, and request objects whose prompts are random text with
lone surrogates, control characters and ComfyUI's prompt syntax, answered by ``web_api.answer`` with ComfyUI's real
tokenizers. Every body gets 200 with an alignment consistent with its prompts, or one of the documented 4xx answers
with ``{"error": message}``; never a 5xx, never an exception. Also the route's handler in an aiohttp server of the
test's own: it answers off the event loop, and with 429 past its bound.

The strategies and :func:`check_answer` also drive the live-server run in ``test_web.py``."""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The route's documented limits (nodes/web_api.py; test_limits_are_the_documented_ones holds them equal).
TOKENIZERS = ("sd1", "sd2", "sdxl")
MAX_BODY_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 2000
MAX_JSON_DEPTH = 32
MAX_PROMPT_NESTING = 32
REFUSALS = (400, 413, 422)

WORDS = ("a", "cat", "dog", "fluffy", "sitting", "on", "the", "bench", "Bench,", "photo.", "motorbike", "(red:1.2)",
         "((cat))", "(red", "cat:1.2)", "\\(cat\\)", "embedding:x", "don't", "🐱", "猫", "naïve", "ǅ")
ODD = "\x00\x01\x1f\x7f\x85\u2028\u200b\ufeff\ufffd\ud800\udfff():\\\t\n "  # control, format, surrogate, syntax
PIECES = ("\x00\x01", "\x00\x02", "\udbff\udc00", "\\(", "\\)")  # ComfyUI's escape markers; a surrogate pair

characters = st.one_of(st.characters(), st.sampled_from(ODD), st.integers(0xD800, 0xDFFF).map(chr))
words = st.one_of(st.sampled_from(WORDS), st.text(characters, min_size=1, max_size=10),
                  st.lists(st.sampled_from(PIECES) | st.sampled_from(WORDS), min_size=1, max_size=3).map("".join))
prompts = st.one_of(st.lists(words, max_size=14).map(" ".join), st.text(characters, max_size=30),
                    st.sampled_from(("", " ", "cat " * 100, "(" * 998 + "cat" + ")" * 998, "((((cat))))", "(cat:" * 300,
                                     "(" * 32 + "cat" + ")" * 32, "(" * 33 + "cat" + ")" * 33, "\\(" * 40 + "cat")))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(characters, max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(characters, max_size=8), inner, max_size=4),
    max_leaves=12)
well_formed = st.fixed_dictionaries({"source": prompts, "target": prompts, "tokenizer": st.sampled_from(TOKENIZERS)})
any_object = st.builds(
    lambda extra, fields: {**extra, **fields},
    st.dictionaries(st.text(characters, max_size=8), json_values, max_size=2),
    st.fixed_dictionaries({}, optional={"source": prompts | json_values, "target": prompts | json_values,
                                        "tokenizer": st.sampled_from(TOKENIZERS) | json_values}))


def _encode(value, ascii_only: bool) -> bytes:
    """JSON as a client may send it: \\u escapes, or UTF-8 (lone surrogates as their 3-byte forms, which Python's
    json module reads back as lone surrogates)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_bodies = st.builds(_encode, st.one_of(well_formed, any_object, json_values), st.booleans())
nested_bodies = st.one_of(
    st.integers(1, 8000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 2700).map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
    (st.integers(1, 5000) | st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3)).map(
        lambda n: b'{"source": "a cat", "target": "a dog", "x": ' + b"[" * n + b"]" * n + b"}"))
bodies = st.one_of(
    json_bodies,
    nested_bodies,
    st.builds(lambda body, cut: body[:cut], json_bodies, st.integers(0, 100)),  # cut short
    st.integers(MAX_BODY_BYTES - 40, MAX_BODY_BYTES + 40).map(
        lambda n: b'{"source": "a cat", "target": "a dog"}'.ljust(n)),  # around the size cap
    st.builds(lambda v: json.dumps(v).encode("utf-16"), well_formed),  # JSON in UTF-16, which json reads
    st.binary(max_size=300))


def depth(value) -> int:
    """How deep lists and dicts nest in a JSON value (0 for a scalar), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, level + 1)
            stack += [(child, level + 1) for child in children]
    return deepest


def nesting(prompt: str) -> int:
    """How deep ComfyUI's prompt weights nest: parentheses after ComfyUI takes out the escaped ones."""
    level = deepest = 0
    for c in prompt.replace("\\(", "").replace("\\)", ""):
        level += {"(": 1, ")": -1}.get(c, 0)
        deepest = max(deepest, level)
    return deepest


def refusal(raw: bytes) -> Optional[int]:
    """The status the route's documented rules give a body before any tokenizing (413 past the size cap or for a
    prompt over MAX_PROMPT_CHARS; 400 for a body that is not JSON, nests over MAX_JSON_DEPTH deep, or is not an
    object of two prompts of valid Unicode text and a known tokenizer; 422 for weights nested over
    MAX_PROMPT_NESTING deep), or None for a well-formed request (then 200, or 422 when the editor refuses the
    prompts)."""
    if len(raw) > MAX_BODY_BYTES:
        return 413
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested far deeper than MAX_JSON_DEPTH
        return 400
    if depth(body) > MAX_JSON_DEPTH or not isinstance(body, dict):
        return 400
    for name in ("source", "target"):
        value = body.get(name)
        if not isinstance(value, str):
            return 400
        if len(value) > MAX_PROMPT_CHARS:
            return 413
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return 400
        if nesting(value) > MAX_PROMPT_NESTING:
            return 422
    return None if body.get("tokenizer", "sd1") in TOKENIZERS else 400


def check_alignment(request: dict, body: dict) -> None:
    """A 200 answer describes the request's prompts: their words as str.split gives them, token positions 1, 2, ...
    without gaps (after the start token), ``replace`` exactly for equal word counts, and an alignment that names
    every target word once, in order, and every source word (kept or deleted)."""
    assert body["tokenizer"] == request.get("tokenizer", "sd1")
    for side in ("source", "target"):
        assert [w["word"] for w in body[side]] == request[side].split()
        positions = [p for w in body[side] for p in w["positions"]]
        assert positions == list(range(1, len(positions) + 1))
    n_source, n_target = len(body["source"]), len(body["target"])
    mode = body["auto_mode"]
    assert mode == ("replace" if n_source == n_target else "refine")
    ops = body["alignment"]
    assert [e["target"] for e in ops if e["target"] is not None] == list(range(n_target))
    if mode == "replace":
        for e in ops:
            same = body["source"][e["source"]]["word"].lower() == body["target"][e["target"]]["word"].lower()
            assert e["source"] == e["target"] and e["op"] == ("same" if same else "replace")
        return
    kept = {e["source"] for e in ops if e["op"] == "same"}
    deleted = [e["source"] for e in ops if e["op"] == "delete"]
    assert sorted(kept | set(deleted)) == list(range(n_source)) and not kept & set(deleted)
    for e in ops:
        assert (e["op"], e["source"] is None, e["target"] is None) in {
            ("same", False, False), ("insert", True, False), ("delete", False, True)}


def check_answer(raw: bytes, status: int, body: dict) -> None:
    """Every answer is JSON, and the status the documented rules give the body (:func:`refusal`); a refusal has
    exactly ``{"error": message}``; a 200 is a consistent alignment."""
    json.dumps(body, allow_nan=False)
    expected = refusal(raw)
    if expected is None:
        assert status in (200, 422), (status, body)
    else:
        assert status == expected, (status, body)
    if status == 200:
        check_alignment(json.loads(raw), body)
    else:
        assert status in REFUSALS and list(body) == ["error"] and isinstance(body["error"], str) and body["error"]


@pytest.fixture(scope="module")
def web_api(comfyui_path, pack):
    from comfyui_direct_inversion.nodes import web_api

    return web_api


def test_limits_are_the_documented_ones(web_api):
    assert (web_api.TOKENIZERS, web_api.MAX_BODY_BYTES, web_api.MAX_PROMPT_CHARS, web_api.MAX_JSON_DEPTH,
            web_api.MAX_PROMPT_NESTING) == (TOKENIZERS, MAX_BODY_BYTES, MAX_PROMPT_CHARS, MAX_JSON_DEPTH,
                                            MAX_PROMPT_NESTING)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=bodies)
def test_any_body_gets_an_alignment_or_a_documented_refusal(web_api, raw):
    status, body = web_api.answer(raw)
    check_answer(raw, status, body)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=well_formed, ascii_only=st.booleans())
def test_any_prompts_get_an_alignment_or_a_documented_refusal(web_api, request, ascii_only):
    raw = _encode(request, ascii_only)
    status, body = web_api.answer(raw)
    check_answer(raw, status, body)


@pytest.mark.parametrize("request_body, status, message", [
    ({"source": "a \ud800 cat", "target": "a dog"}, 400,
     "The source prompt is not valid text: character 2 is a lone surrogate (U+D800)"),
    ({"source": "a cat", "target": "a dog\udfff"}, 400,
     "The target prompt is not valid text: character 5 is a lone surrogate (U+DFFF)"),
    ({"source": "a cat", "target": "a dog", "tokenizer": "\ud800" * 100}, 400, "Unknown tokenizer '\\ud800"),
    ({"source": "a cat", "target": "a dog", "tokenizer": [10 ** 4000]}, 400, "'tokenizer' must be a string"),
    ({"source": "a cat", "target": "(" * 998 + "cat" + ")" * 998}, 422,
     "The target prompt nests parentheses 998 deep; at most 32 for Prompt-to-Prompt."),
    ({"source": "\\(" * 40 + "(" * 33 + "cat" + ")" * 33, "target": "a dog"}, 422,
     "source prompt nests parentheses 33 deep"),
])
def test_refusals_say_what_is_wrong(web_api, request_body, status, message):
    raw = _encode(request_body, True)
    assert web_api.answer(raw)[0] == status and message in web_api.answer(raw)[1]["error"]


NESTED = b'{"source": "a cat", "target": "a dog", "x": %s}'


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 2500 + b"0" + b"}" * 2500,
                                 NESTED % (b"[" * 4000 + b"]" * 4000), NESTED % (b"[" * 32 + b"]" * 32),
                                 NESTED % (b'{"[": "[[", "a": ' * 32 + b"0" + b"}" * 32), b"[" * 40])
def test_deeply_nested_json_is_refused(web_api, raw):
    assert web_api.answer(raw) == (400, {"error": "The request body nests arrays and objects more than 32 deep. "
                                                  "The request body must be a JSON object with source, target and "
                                                  "tokenizer."})


@pytest.mark.parametrize("raw", [NESTED % (b"[" * 31 + b"]" * 31), NESTED % (rb'["\\", "\"' + b"[" * 40 + b'", "]]"]')])
def test_json_nesting_up_to_the_limit_is_read(web_api, raw):
    assert web_api.answer(raw)[0] == 200


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_control_characters_are_aligned_as_the_tokenizer_sees_them(web_api, tokenizer):
    """ComfyUI's tokenizers read control characters (NUL too) as text: such prompts are aligned like any other.
    U+001C..U+001F are whitespace to the editor's word splitting (str.split) but not to the tokenizers, so the editor
    refuses a prompt holding them, and so does the route: 422, not a failure."""
    request = {"source": "a \x00 cat \x7f", "target": "a d\x01og \x85", "tokenizer": tokenizer}
    status, body = web_api.answer(_encode(request, True))
    assert status == 200, body
    assert [w["word"] for w in body["source"]] == ["a", "\x00", "cat", "\x7f"]
    check_alignment(request, body)
    request = {"source": "a cat\x1fsitting", "target": "a dog", "tokenizer": tokenizer}
    status, body = web_api.answer(_encode(request, True))
    assert status == 422 and "could not be matched to its tokens" in body["error"]


def _serve(web_api, route, scenario):
    """Run ``scenario(client)`` against an aiohttp server on 127.0.0.1 with ``route``'s handler and a /ping route."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def ping(request):
        return web.json_response({"pong": True})

    async def main():
        app = web.Application()
        app.router.add_post(web_api.ROUTE, route.handle)
        app.router.add_get("/ping", ping)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await scenario(client)

    asyncio.run(main())


def test_route_answers_off_the_event_loop_and_refuses_past_its_bound(web_api, monkeypatch):
    release, started, finished = threading.Event(), [], []

    def blocked_answer(raw):
        started.append(threading.current_thread())
        release.wait(10)
        finished.append(raw)
        return 200, {"raw": raw.decode()}

    monkeypatch.setattr(web_api, "answer", blocked_answer)
    route = web_api.AlignmentRoute(max_pending=3)

    async def scenario(client):
        waiting = [asyncio.create_task(client.post(web_api.ROUTE, data=f'"{i}"'.encode())) for i in range(3)]
        for _ in range(500):
            if route.pending == 3 and started:
                break
            await asyncio.sleep(0.01)
        refused = await client.post(web_api.ROUTE, data=b'"3"')
        assert refused.status == 429 and "try again" in (await refused.json())["error"]
        pong = await client.get("/ping")  # the event loop serves other routes while the answers are blocked
        assert pong.status == 200 and not finished
        release.set()
        answers = [await (await task).json() for task in waiting]
        assert answers == [{"raw": f'"{i}"'} for i in range(3)] and route.pending == 0
        again = await client.post(web_api.ROUTE, data=b'"4"')
        assert again.status == 200

    _serve(web_api, route, scenario)
    assert {t.name.split("_")[0] for t in started} == {"DirectInversion-p2p-alignment"}
    assert threading.main_thread() not in started


def test_route_answers_its_own_failure_as_json(web_api, monkeypatch):
    def broken_answer(raw):
        raise RuntimeError("tokenizer files missing")

    monkeypatch.setattr(web_api, "answer", broken_answer)

    async def scenario(client):
        response = await client.post(web_api.ROUTE, data=b"{}")
        assert response.status == 500
        assert await response.json() == {
            "error": "The server could not align the prompts: RuntimeError: tokenizer files missing"}

    _serve(web_api, web_api.AlignmentRoute(), scenario)
