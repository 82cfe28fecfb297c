"""sse: framing on event boundaries at any split, usage scan and strip, estimate, extract_usage."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest

from flintproxy.http.client import UpstreamTooLarge
from flintproxy.http.sse import (
    MAX_PENDING,
    SMALL_BODY,
    StreamScanner,
    StreamStyle,
    Usage,
    extract_usage,
    usage_from_dict,
)

CHUNK_HEAD: dict[str, Any] = {
    "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1700000000,
    "model": "gpt-4o-mini", "system_fingerprint": None,
}
# Content that spells out a usage key: inside a JSON string its quotes are escaped.
TRICKY_CONTENT = 'Here you go: {"usage":{"prompt_tokens":999,"completion_tokens":999}}'
CONTENTS = ["Hello", ",", " world", " \u00e9\u4e16", TRICKY_CONTENT, "!"]
USAGE: dict[str, Any] = {
    "prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
}
EXPECTED_USAGE = Usage(prompt_tokens=12, completion_tokens=6, cached_tokens=4,
                       reasoning_tokens=2)


def event(obj: dict[str, Any] | str, spaced: bool = False) -> bytes:
    if isinstance(obj, str):
        payload = obj.encode()
    else:
        payload = json.dumps(obj).encode() if spaced else orjson.dumps(obj)
    return b"data: " + payload + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {**CHUNK_HEAD, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                       "finish_reason": finish}], "usage": None}


def content_events() -> list[bytes]:
    events = [event(chunk({"role": "assistant", "content": ""}))]
    events += [event(chunk({"content": c})) for c in CONTENTS]
    events.append(event(chunk({}, finish="stop")))
    return events


def usage_event(spaced: bool = False) -> bytes:
    return event({**CHUNK_HEAD, "choices": [], "usage": USAGE}, spaced=spaced)


DONE = event("[DONE]")
BODY_EVENTS = content_events()
STREAM = b"".join(BODY_EVENTS) + usage_event() + DONE
STREAM_WITHOUT_USAGE = b"".join(BODY_EVENTS) + DONE
DATA_EVENTS = len(BODY_EVENTS) + 2  # role/content/finish chunks, the usage chunk, [DONE]


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def random_pieces(data: bytes, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.randint(1, 200)
        yield data[i:i + n]
        i += n


def relay(scanner: StreamScanner, blocks: Iterable[bytes]) -> bytes:
    """What the relay would write: every feed() result, then flush()."""
    out = []
    for block in blocks:
        forwarded = scanner.feed(block)
        if forwarded:
            assert forwarded.endswith((b"\n\n", b"\r\n\r\n")), "forwarded on an event boundary"
        out.append(forwarded)
    out.append(scanner.flush())
    return b"".join(out)


SPLITS = {
    "whole": lambda data: [data],
    "1-byte": lambda data: pieces(data, 1),
    "7-byte": lambda data: pieces(data, 7),
    "random-1": lambda data: random_pieces(data, 1),
    "random-2": lambda data: random_pieces(data, 2),
    "random-3": lambda data: random_pieces(data, 3),
}


# --- the stream scanner -------------------------------------------------------------


def test_the_tricky_content_really_holds_an_escaped_usage_key() -> None:
    assert b'\\"usage\\":{' in STREAM_WITHOUT_USAGE
    assert STREAM.count(b'"usage":{') == 1  # only the real usage chunk


@pytest.mark.parametrize("split", list(SPLITS))
def test_any_split_forwards_the_same_bytes_and_finds_the_usage(split: str) -> None:
    scanner = StreamScanner(strip_usage=False)
    assert relay(scanner, SPLITS[split](STREAM)) == STREAM
    assert scanner.usage == EXPECTED_USAGE
    assert scanner.estimated_completion_tokens() == DATA_EVENTS
    assert scanner.done


@pytest.mark.parametrize("split", list(SPLITS))
def test_any_split_strips_only_the_usage_only_chunk(split: str) -> None:
    scanner = StreamScanner(strip_usage=True)
    assert relay(scanner, SPLITS[split](STREAM)) == STREAM_WITHOUT_USAGE
    assert scanner.usage == EXPECTED_USAGE
    assert scanner.estimated_completion_tokens() == DATA_EVENTS - 1


@pytest.mark.parametrize("strip", [False, True])
def test_every_two_piece_split_gives_the_same_result(strip: bool) -> None:
    expected = STREAM_WITHOUT_USAGE if strip else STREAM
    for cut in range(len(STREAM) + 1):
        scanner = StreamScanner(strip_usage=strip)
        assert relay(scanner, [STREAM[:cut], STREAM[cut:]]) == expected, cut
        assert scanner.usage == EXPECTED_USAGE, cut


@pytest.mark.parametrize("strip", [False, True])
def test_spaced_usage_formatting_is_found(strip: bool) -> None:
    spaced = usage_event(spaced=True)
    assert b'"usage": {' in spaced
    stream = b"".join(BODY_EVENTS) + spaced + DONE
    for split in ("whole", "7-byte", "random-1"):
        scanner = StreamScanner(strip_usage=strip)
        assert relay(scanner, SPLITS[split](stream)) == (STREAM_WITHOUT_USAGE if strip
                                                         else stream)
        assert scanner.usage == EXPECTED_USAGE


@pytest.mark.parametrize("strip", [False, True])
def test_usage_text_inside_content_is_not_usage(strip: bool) -> None:
    for split in ("whole", "1-byte", "random-2"):
        scanner = StreamScanner(strip_usage=strip)
        assert relay(scanner, SPLITS[split](STREAM_WITHOUT_USAGE)) == STREAM_WITHOUT_USAGE
        assert scanner.usage is None
        assert scanner.estimated_completion_tokens() == DATA_EVENTS - 1


def test_usage_on_content_chunks_is_read_and_kept_only_for_a_client_that_asked() -> None:
    # Upstreams with continuous usage stats put usage on chunks that carry choices.
    with_usage = {**chunk({"content": "hi"}), "usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 1}}
    last = {**chunk({"content": "!"}), "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    stream = event(with_usage) + event(last) + DONE
    asked = StreamScanner(strip_usage=False)
    assert relay(asked, pieces(stream, 5)) == stream
    scanner = StreamScanner(strip_usage=True)
    out = relay(scanner, pieces(stream, 5))
    assert b'"usage":{' not in out and out.count(b"data:") == 3
    assert scanner.usage == Usage(prompt_tokens=3, completion_tokens=2)


def test_an_empty_choices_chunk_without_usage_is_kept() -> None:
    stream = event({**CHUNK_HEAD, "choices": [], "usage": None}) + DONE
    scanner = StreamScanner(strip_usage=True)
    assert relay(scanner, [stream]) == stream
    assert scanner.usage is None


def test_comments_and_multi_line_data_events() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    # One JSON document over two data lines: the parser joins them with a newline.
    first, rest = json.dumps(usage).split(", ", 1)
    split_usage = f"data: {first},\ndata: {rest}\n\n".encode()
    stream = b": keep-alive\n\n" + event(chunk({"content": "x"})) + split_usage + DONE
    scanner = StreamScanner(strip_usage=True)
    assert relay(scanner, pieces(stream, 3)) == (b": keep-alive\n\n"
                                                  + event(chunk({"content": "x"})) + DONE)
    assert scanner.usage == Usage(prompt_tokens=2, completion_tokens=1)


def test_a_malformed_usage_event_is_forwarded_and_ignored() -> None:
    stream = b'data: {"choices":[],"usage":{"prompt_tokens":\n\n' + DONE
    scanner = StreamScanner(strip_usage=True)
    assert relay(scanner, [stream]) == stream
    assert scanner.usage is None


def test_a_partial_event_is_held_until_its_blank_line() -> None:
    scanner = StreamScanner(strip_usage=False)
    first, second = event(chunk({"content": "a"})), event(chunk({"content": "b"}))
    assert scanner.feed(first + second[:10]) == first
    assert scanner.pending == second[:10]
    assert scanner.feed(second[10:-1]) == b""
    assert scanner.feed(second[-1:]) == second[:10] + second[10:]
    assert scanner.pending == b""


def test_flush_returns_the_held_partial_event_once() -> None:
    scanner = StreamScanner(strip_usage=False)
    partial = b'data: {"choices":[{"delta":{"content":"tail"}}]}'
    assert scanner.feed(event(chunk({"content": "a"})) + partial) == event(chunk({"content": "a"}))
    assert scanner.flush() == partial
    assert scanner.flush() == b""
    assert scanner.estimated_completion_tokens() == 1  # only events forwarded by feed()


def test_estimated_completion_tokens_counts_forwarded_data_events() -> None:
    scanner = StreamScanner(strip_usage=False)
    assert scanner.estimated_completion_tokens() == 0
    scanner.feed(b": keep-alive\n\n")
    assert scanner.estimated_completion_tokens() == 0  # comments are not data
    scanner.feed(event(chunk({"role": "assistant"})) + event(chunk({"content": "a"}))[:5])
    assert scanner.estimated_completion_tokens() == 1  # the held half is not counted yet
    scanner.feed(event(chunk({"content": "a"}))[5:])
    assert scanner.estimated_completion_tokens() == 2


def test_an_oversized_event_is_the_upstreams_fault_and_never_buffered_past_its_bound() -> None:
    head = event(chunk({"content": "a"}))
    huge = b"data: " + b"x" * (MAX_PENDING + 100_000)  # no blank line in sight
    stream = head + huge + b"\n\n" + event(chunk({"content": "b"})) + usage_event() + DONE
    scanner = StreamScanner(strip_usage=True)
    out = []
    with pytest.raises(UpstreamTooLarge):
        for block in pieces(stream, 64 * 1024):
            out.append(scanner.feed(block))
            assert len(scanner.pending) <= MAX_PENDING  # bounded while framing
    assert out[0] == head  # framed up to the oversized event


def test_an_event_up_to_the_bound_is_relayed_whole() -> None:
    scanner = StreamScanner(strip_usage=False, max_event=2048)
    big = b"data: " + b"x" * 2000 + b"\n\n"
    assert b"".join(scanner.feed(b) for b in pieces(big, 100)) == big
    with pytest.raises(UpstreamTooLarge):
        scanner.feed(b"data: " + b"y" * 2100)


def test_usage_on_a_content_chunk_is_removed_from_that_event_only() -> None:
    content = chunk({"content": "a"})
    with_usage = {**chunk({}, "stop"), "usage": USAGE}
    stream = event(content) + event(with_usage) + DONE
    scanner = StreamScanner(strip_usage=True)
    out = b"".join(scanner.feed(b) for b in pieces(stream, 13)) + scanner.flush()
    assert scanner.usage == EXPECTED_USAGE
    assert b'"usage":{' not in out and b'"usage": {' not in out
    assert out.startswith(event(content))  # the others, byte for byte
    assert out.endswith(DONE)
    rewritten = orjson.loads(out[len(event(content)):-len(DONE)].removeprefix(b"data: "))
    assert rewritten == {k: v for k, v in with_usage.items() if k != "usage"}
    kept = StreamScanner(strip_usage=False)
    assert b"".join(kept.feed(b) for b in pieces(stream, 13)) + kept.flush() == stream


def test_a_done_event_is_noticed_only_as_an_event() -> None:
    scanner = StreamScanner(strip_usage=False)
    scanner.feed(event(chunk({"content": "data: [DONE] spelled in content"})))
    assert not scanner.done
    scanner.feed(DONE)
    assert scanner.done


# --- \r\n framing -------------------------------------------------------------------

CRLF_STREAM = (STREAM.replace(b"\n", b"\r\n"))


def test_crlf_framing_is_passed_through_intact() -> None:
    """\r\n\r\n ends an event too: the bytes arrive intact, event by event."""
    for strip in (False, True):
        scanner = StreamScanner(strip_usage=strip)
        forwarded = b"".join(scanner.feed(b) for b in pieces(CRLF_STREAM, 7))
        forwarded += scanner.flush()
        assert scanner.usage is not None
        assert scanner.estimated_completion_tokens() > 0
        if not strip:
            assert forwarded == CRLF_STREAM


def test_crlf_events_are_forwarded_at_their_boundaries_with_usage() -> None:
    scanner = StreamScanner(strip_usage=False)
    first = BODY_EVENTS[0].replace(b"\n", b"\r\n")
    assert scanner.feed(first) == first
    assert relay(scanner, [CRLF_STREAM[len(first):]]) == CRLF_STREAM[len(first):]
    assert scanner.usage == EXPECTED_USAGE


def test_extra_blank_lines_next_to_usage_are_forwarded_untouched() -> None:
    stream = b"".join(BODY_EVENTS) + usage_event() + b"\n\n" + DONE
    scanner = StreamScanner(strip_usage=False)
    assert relay(scanner, [stream]) == stream


# --- non-stream bodies --------------------------------------------------------------


def chat_body(usage: object, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": TRICKY_CONTENT,
                                 "refusal": None}}],
        "usage": usage, "system_fingerprint": "fp_1", **extra,
    }


def test_extract_usage_from_a_chat_completion() -> None:
    body = orjson.dumps(chat_body({"prompt_tokens": 9, "completion_tokens": 3,
                                   "total_tokens": 12}))
    assert extract_usage(body) == Usage(prompt_tokens=9, completion_tokens=3)


def test_extract_usage_with_cached_and_reasoning_details() -> None:
    assert extract_usage(orjson.dumps(chat_body(USAGE))) == EXPECTED_USAGE


def test_extract_usage_from_a_completion_and_embeddings() -> None:
    completion = {"id": "cmpl-1", "object": "text_completion", "model": "gpt-4o-mini",
                  "choices": [{"text": "hi", "index": 0, "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}}
    assert extract_usage(orjson.dumps(completion)) == Usage(prompt_tokens=4,
                                                            completion_tokens=16)
    embeddings = {"object": "list", "model": "text-embedding-3-small",
                  "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
                  "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert extract_usage(orjson.dumps(embeddings)) == Usage(prompt_tokens=8)


def test_extract_usage_with_spaced_and_indented_formatting() -> None:
    assert extract_usage(json.dumps(chat_body(USAGE)).encode()) == EXPECTED_USAGE
    assert extract_usage(json.dumps(chat_body(USAGE), indent=2).encode()) == EXPECTED_USAGE
    assert extract_usage(b'{"usage" :\n {"prompt_tokens" : 1}}') == Usage(prompt_tokens=1)


def test_extract_usage_null_or_absent() -> None:
    assert extract_usage(orjson.dumps(chat_body(None))) is None
    body = chat_body(None)
    del body["usage"]
    assert extract_usage(orjson.dumps(body)) is None  # the escaped text in content is not it
    assert extract_usage(b"") is None
    assert extract_usage(b"not json at all") is None


def test_extract_usage_with_deeper_nesting_takes_the_general_path() -> None:
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": 4,
                                                "by_modality": {"text": 8, "image": 4}},
             "provider": {"name": "x{y}", "quote": 'a"}b'}}
    assert extract_usage(orjson.dumps(chat_body(usage))) == EXPECTED_USAGE
    # Escaped quotes in a string one level down.
    quoted = {"prompt_tokens": 5, "x": {"note": 'a"b'}, "completion_tokens": 2}
    assert extract_usage(orjson.dumps(chat_body(quoted))) == Usage(prompt_tokens=5,
                                                                   completion_tokens=2)


def test_extract_usage_with_a_brace_in_a_nested_string() -> None:
    odd = {"prompt_tokens": 5, "completion_tokens_details": {"note": "}", "x": '"{',
                                                             "reasoning_tokens": 1}}
    assert extract_usage(orjson.dumps(chat_body(odd))) == Usage(prompt_tokens=5,
                                                                reasoning_tokens=1)


def test_extract_usage_on_a_truncated_body() -> None:
    body = orjson.dumps(chat_body(USAGE))
    assert extract_usage(body[:body.index(b'"usage"') + 30]) is None


def test_extract_usage_when_the_word_usage_follows_the_usage_object() -> None:
    body = (b'{"id":"x","usage":{"prompt_tokens":9,"completion_tokens":3},'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":"usage"}}]}')
    assert extract_usage(body) == Usage(prompt_tokens=9, completion_tokens=3)


def test_extract_usage_of_large_bodies_scans_for_the_usage_object() -> None:
    # Over SMALL_BODY the body is not parsed whole: the same answers by the scan.
    def large(body: dict[str, Any]) -> bytes:
        out = orjson.dumps({"pad": "x" * SMALL_BODY, **body})
        assert len(out) > SMALL_BODY
        return out

    assert extract_usage(large(chat_body(USAGE))) == EXPECTED_USAGE
    assert extract_usage(large(chat_body(None))) is None
    nested = {**USAGE, "provider": {"name": "x{y}", "quote": 'a"}b', "deep": {"k": [1]}}}
    assert extract_usage(large(chat_body(nested))) == EXPECTED_USAGE
    embeddings = {"object": "list", "data": [{"embedding": [0.25] * 2000}],
                  "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert extract_usage(large(embeddings)) == Usage(prompt_tokens=8)
    body = large(chat_body(USAGE))
    assert extract_usage(body[:body.index(b'"usage"') + 30]) is None


def test_usage_from_dict_is_lenient_about_types() -> None:
    assert usage_from_dict(None) is None
    assert usage_from_dict([1, 2]) is None
    assert usage_from_dict({}) == Usage()
    got = usage_from_dict({"prompt_tokens": -1, "completion_tokens": True,
                           "prompt_tokens_details": None,
                           "completion_tokens_details": {"reasoning_tokens": "7"}})
    assert got == Usage()


# --- the Responses and Anthropic styles ----------------------------------------------------


def _named(kind: str, obj: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


def test_anthropic_usage_is_read_from_message_start_and_message_delta_never_stripped() -> None:
    start = _named("message_start", {"message": {"id": "m", "content": [], "usage": {
        "input_tokens": 10, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 6,
        "output_tokens": 1}}})
    delta = _named("content_block_delta", {"index": 0, "delta": {
        "type": "text_delta", "text": 'a "usage":{"input_tokens": 999} event: message_stop'}})
    end = (_named("message_delta", {"delta": {"stop_reason": "end_turn"},
                                    "usage": {"output_tokens": 12}})
           + _named("message_stop", {}))
    scanner = StreamScanner(strip_usage=True, style=StreamStyle.ANTHROPIC)
    assert scanner.feed(start + delta) == start + delta
    assert not scanner.done and not scanner.final
    assert scanner.usage == Usage(20, 1, 6, 0, 4)
    assert scanner.feed(end) == end
    assert scanner.done and scanner.final
    assert scanner.usage == Usage(20, 12, 6, 0, 4)


def test_responses_usage_is_the_completed_events_own_not_a_tool_schemas() -> None:
    schema = {"type": "object", "properties": {"usage": {"type": "string"}}}
    done = _named("response.completed", {"response": {
        "id": "r", "output": [{"content": [{"text": '"usage":{"input_tokens":5}'}]}],
        "tools": [{"type": "function", "parameters": schema}],
        "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 8},
                  "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 3}},
        "metadata": {}}})
    created = _named("response.created", {"response": {"id": "r", "usage": None}})
    scanner = StreamScanner(strip_usage=True, style=StreamStyle.RESPONSES)
    assert scanner.feed(created) == created and scanner.usage is None and not scanner.done
    assert scanner.feed(done[:40]) == b""
    assert scanner.feed(done[40:]) == done
    assert scanner.done and scanner.final
    assert scanner.usage == Usage(30, 20, 8, 3, 0)


def test_usage_in_each_api_shape() -> None:
    assert usage_from_dict({"prompt_tokens": 5, "completion_tokens": 2,
                            "prompt_tokens_details": {"cached_tokens": 1}}) == Usage(5, 2, 1)
    assert usage_from_dict({"input_tokens": 5, "output_tokens": 2,
                            "input_tokens_details": {"cached_tokens": 1,
                                                     "cache_write_tokens": 2}}) == Usage(
        5, 2, 1, 0, 2)
    assert usage_from_dict({"input_tokens": 5, "cache_creation_input_tokens": 3,
                            "cache_read_input_tokens": 2, "output_tokens": 7}) == Usage(
        10, 7, 2, 0, 3)
    assert usage_from_dict({"input_tokens": -5, "output_tokens": "7",
                            "cache_read_input_tokens": True}) == Usage(0, 0, 0, 0, 0)
