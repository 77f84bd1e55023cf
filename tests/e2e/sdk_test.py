#!/usr/bin/env python3
"""Official OpenAI and Anthropic Python SDKs against a running ds4-server.

Needs: openai>=1 (tested 3.57.0) and anthropic (tested 2.14.0), e.g. in /root/venv-ds4:
    /root/venv-ds4/bin/pip install openai anthropic
Run through ./run.sh (starts the server with the demo model), or by hand:
    DS4_URL=http://127.0.0.1:8000 DS4_API_KEY=... python3 sdk_test.py
The demo model has random weights, so only shapes and protocol behaviour are checked,
never the text. Prints 'N passed, N failed' and exits non-zero on any failure.
"""
import os
import sys
import traceback

import anthropic
import openai

URL = os.environ.get("DS4_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("DS4_API_KEY", "dsv4-local")

oa = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0)
an = anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

results = []


def case(fn):
    try:
        fn()
        results.append((fn.__name__, None))
    except Exception:  # noqa: BLE001 - report every failure
        results.append((fn.__name__, traceback.format_exc()))
    return fn


@case
def openai_models():
    ids = [m.id for m in oa.models.list()]
    assert ids[:3] == ["deepseek-v4-flash", "deepseek-chat", "deepseek-reasoner"], ids
    assert oa.models.retrieve("deepseek-chat").id == "deepseek-chat"


@case
def openai_chat_non_streaming():
    r = oa.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=4, seed=1)
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason in ("length", "stop"), r
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 0


@case
def openai_chat_streaming_with_reasoning_and_usage():
    s = oa.chat.completions.create(model="deepseek-reasoner", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=5, stream=True, stream_options={"include_usage": True}, tools=TOOLS)
    finish, usage, n = None, None, 0
    for chunk in s:
        n += 1
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            finish = c.finish_reason or finish
    assert n >= 3 and finish in ("length", "stop", "tool_calls"), (n, finish)
    assert usage is not None and usage.completion_tokens == 5, usage


@case
def openai_completions():
    r = oa.completions.create(model="deepseek-v4-flash", prompt="Once upon a time", max_tokens=3)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 3


@case
def openai_errors_are_typed():
    try:
        oa.chat.completions.create(model="x", messages=[], max_tokens=1)
        raise AssertionError("expected 400")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "empty" in str(e)
    try:
        oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "x" * 200_000}], max_tokens=1)
        raise AssertionError("expected context_length_exceeded")
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e


@case
def openai_responses():
    r = oa.responses.create(model="deepseek-v4-flash", input="Hi", max_output_tokens=4,
                            reasoning={"effort": "high", "summary": "auto"})
    assert r.object == "response" and r.status in ("completed", "incomplete"), r
    assert r.usage.output_tokens <= 4
    # Raw event stream: the SDK's stream() helper only accepts response.completed, and a
    # 4-token budget ends as response.incomplete.
    events = list(oa.responses.create(model="deepseek-chat", input="Hi", max_output_tokens=4, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"], types
    assert types[-1] in ("response.completed", "response.incomplete"), types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.id.startswith("resp_")


@case
def anthropic_messages():
    m = an.messages.create(model="deepseek-v4-flash", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                           system="Be brief.")
    assert m.type == "message" and m.stop_reason in ("max_tokens", "end_turn"), m
    assert m.id.startswith("msg_") and m.usage.output_tokens <= 4
    assert any(b.type == "text" for b in m.content)


@case
def anthropic_streaming():
    types = []
    with an.messages.stream(model="deepseek-reasoner", max_tokens=5,
                            messages=[{"role": "user", "content": "Hi"}]) as s:
        for ev in s:
            types.append(ev.type)
        final = s.get_final_message()
    assert types[0] == "message_start" and "message_stop" in types, types
    assert final.usage.output_tokens == 5, final.usage


@case
def anthropic_count_tokens_and_errors():
    n = an.messages.count_tokens(model="x", messages=[{"role": "user", "content": "Hi"}])
    assert n.input_tokens > 0
    try:
        an.messages.create(model="x", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
        raise AssertionError("expected 400")
    except anthropic.BadRequestError as e:
        assert e.status_code == 400


AN_TOOLS = [{"name": "get_weather", "description": "Weather for a city.",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
RS_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather for a city.",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
Q = "Weather in Rome?"


# Agent loops: the demo model never calls a tool by itself, so turn 1 forces the call
# (tool_choice, enforced by constrained decoding); turn 2 resends the whole history with
# the tool result, which must re-render byte-identically (exact DSML replay by tool id)
# and reuse the live KV prefix: everything but the last sampled token of turn 1.
@case
def openai_tool_loop_reuses_prefix():
    msgs = [{"role": "user", "content": Q}]
    r1 = oa.chat.completions.create(model="deepseek-chat", messages=msgs, max_tokens=48, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    m = r1.choices[0].message
    assert r1.choices[0].finish_reason == "tool_calls" and m.tool_calls[0].function.name == "get_weather", r1
    msgs.append({"role": "assistant", "content": m.content,
                 "tool_calls": [tc.model_dump(exclude_none=True) for tc in m.tool_calls]})
    msgs.append({"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "21 C, sunny"})
    r2 = oa.chat.completions.create(model="deepseek-chat", messages=msgs, max_tokens=2, tools=TOOLS)
    want = r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert r2.usage.prompt_tokens_details.cached_tokens == want, (r2.usage, want)


@case
def anthropic_tool_loop_reuses_prefix():
    msgs = [{"role": "user", "content": Q}]
    m1 = an.messages.create(model="deepseek-chat", max_tokens=48, messages=msgs, tools=AN_TOOLS,
                            tool_choice={"type": "tool", "name": "get_weather"})
    uses = [b for b in m1.content if b.type == "tool_use"]
    assert m1.stop_reason == "tool_use" and uses[0].name == "get_weather", m1
    msgs.append({"role": "assistant", "content": m1.content})
    msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                              "content": "21 C, sunny"}]})
    m2 = an.messages.create(model="deepseek-chat", max_tokens=2, messages=msgs, tools=AN_TOOLS)
    p1 = m1.usage.input_tokens + (m1.usage.cache_read_input_tokens or 0)
    want = p1 + m1.usage.output_tokens - 1
    assert m2.usage.cache_read_input_tokens == want, (m2.usage, want)


@case
def responses_tool_loop_reuses_prefix():
    r1 = oa.responses.create(model="deepseek-chat", input=Q, max_output_tokens=48, tools=RS_TOOLS,
                             tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r1.output if o.type == "function_call"]
    assert r1.status == "completed" and calls[0].name == "get_weather", r1
    items = [{"type": "message", "role": "user", "content": Q}]
    items += [o.model_dump(exclude_none=True) for o in r1.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C, sunny"})
    r2 = oa.responses.create(model="deepseek-chat", input=items, max_output_tokens=2, tools=RS_TOOLS)
    want = r1.usage.input_tokens + r1.usage.output_tokens - 1
    assert r2.usage.input_tokens_details.cached_tokens == want, (r2.usage, want)


@case
def tool_choice_required_streams_a_call():
    names = []
    for chunk in oa.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": Q}],
                                            max_tokens=48, tools=TOOLS, tool_choice="required", stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
    assert names == ["get_weather"], names
    with an.messages.stream(model="deepseek-chat", max_tokens=48, messages=[{"role": "user", "content": Q}],
                            tools=AN_TOOLS, tool_choice={"type": "any"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].name == "get_weather", final
    try:
        oa.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
        raise AssertionError("expected 400")
    except openai.BadRequestError as e:
        assert e.status_code == 400


failed = [(n, t) for n, t in results if t]
for n, t in failed:
    print(f"FAIL {n}\n{t}", file=sys.stderr)
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
