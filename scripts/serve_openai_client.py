#!/usr/bin/env python3
"""Drives `rocmforge serve` with the official `openai` Python client.

Usage: serve_openai_client.py BASE_URL MODEL
Checks a completion, a chat completion and a streamed chat completion; the streamed text must
equal the non-streamed text at temperature 0. Then log probabilities (the top entries' probabilities
sum to at most 1, the chosen token is the first at temperature 0), `n=3` (three equal choices at
temperature 0), embeddings (the client's default base64 encoding, vectors of length 1) and
structured output: 20 prompts in JSON mode and 20 under a JSON schema, every output that ends
(`finish_reason` "stop") parsed and validated with `jsonschema`; under the schema (whose documents
are short) every output must end. Tool calls: a round trip (tools with tool_choice "required" give
calls whose arguments validate with `jsonschema`, streamed the same; the result sent back gives a
plain assistant reply). `echo` with prompt log-probabilities, `best_of`, and a GBNF `grammar`
(through `extra_body`). Prints "ok" and exits 0 on success.
"""
import json
import math
import sys

try:
    import jsonschema
    import openai
except ImportError as e:
    sys.exit(f"{e.name} is missing: pip install -r scripts/requirements-test.txt")

TOPICS = ["a cat", "the moon", "a red car", "Paris", "a teacher", "an apple", "a river",
          "a computer", "a birthday party", "a dog", "winter", "a pizza", "the ocean",
          "a guitar", "a library", "a mountain", "coffee", "a train", "a garden", "football"]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "color": {"enum": ["red", "green", "blue", "other"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["name", "color", "count"],
    "additionalProperties": False,
}


def structured(client, model) -> None:
    ended = 0
    for t in TOPICS:
        msgs = [{"role": "user", "content": f"Describe {t} as JSON."}]
        r = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=96, temperature=0,
            response_format={"type": "json_object"},
        )
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length"), c
        if c.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:
            # Cut by max_tokens, reported as such: never a whole document, since the mask ends
            # the reply as soon as the object closes.
            assert r.usage.completion_tokens == 96, r.usage
        r = client.chat.completions.create(
            model=model, messages=msgs, max_tokens=64, temperature=0,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "thing", "schema": SCHEMA}},
        )
        c = r.choices[0]
        assert c.finish_reason == "stop", (t, c)
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    # SmolLM2-135M rambles inside free-form objects: 8 of these 20 close within 96 tokens
    # (greedy, so always the same 8); the bound catches a mask that never lets one end.
    assert ended >= 5, ended
    # Streamed under the schema: the same text.
    msgs = [{"role": "user", "content": "Describe a cat as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    whole = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=64, temperature=0, response_format=fmt
    ).choices[0].message.content
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=msgs, max_tokens=64, temperature=0, response_format=fmt, stream=True
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert "".join(pieces) == whole, (pieces, whole)


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "The current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]


def tool_round_trip(client, model) -> None:
    msgs = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.chat.completions.create(
        model=model, messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=80,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    calls = c.message.tool_calls
    assert calls, c
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.type == "function" and call.id, call
        assert call.function.name in schemas, call
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    # Streamed: the same calls, from OpenAI's delta shape as the client assembles it.
    got = {}
    finish = None
    for chunk in client.chat.completions.create(
        model=model, messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=80,
        temperature=0, stream=True,
    ):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                e = got.setdefault(d.index, {"name": "", "arguments": ""})
                e["name"] += d.function.name or ""
                e["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls", finish
    assert [got[i] for i in sorted(got)] == [
        {"name": k.function.name, "arguments": k.function.arguments} for k in calls
    ], (got, calls)
    # A named function: exactly that one.
    named = client.chat.completions.create(
        model=model, messages=msgs, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    ).choices[0].message.tool_calls
    assert [k.function.name for k in named] == ["get_time"], named
    # The result goes back; the model answers in text.
    msgs.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": k.id, "type": "function",
         "function": {"name": k.function.name, "arguments": k.function.arguments}}
        for k in calls]})
    for k in calls:
        msgs.append({"role": "tool", "tool_call_id": k.id,
                     "content": json.dumps({"temperature": 18, "sky": "cloudy"})})
    r = client.chat.completions.create(
        model=model, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=40, temperature=0,
    )
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content, c
    assert not c.message.tool_calls, c
    assert c.finish_reason in ("stop", "length"), c
    # A bad definition is a 400 naming the field.
    try:
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=4,
            tools=[{"type": "function", "function": {"name": "no spaces allowed"}}],
        )
        raise AssertionError("bad tool accepted")
    except openai.BadRequestError as e:
        assert "tools[0].function.name" in str(e), e


def completions_extras(client, model) -> None:
    prompt = "The capital of France is"
    e = client.completions.create(
        model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    c = e.choices[0]
    assert c.text.startswith(prompt), c.text
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:]), lp
    assert "".join(lp.tokens) == c.text, (lp.tokens, c.text)
    best = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3,
        n=2, best_of=4,
    )
    assert len(best.choices) == 2, best
    try:
        client.completions.create(model=model, prompt="a", max_tokens=2, n=3, best_of=2)
        raise AssertionError("best_of < n accepted")
    except openai.BadRequestError:
        pass
    g = client.completions.create(
        model=model, prompt="Answer:", max_tokens=10, temperature=1.0, seed=1,
        extra_body={"grammar": 'root ::= ("yes" | "no") " " [0-9]{1,3}'},
    )
    t = g.choices[0].text
    head, _, digits = t.partition(" ")
    assert head in ("yes", "no") and 1 <= len(digits) <= 3 and digits.isdigit(), t


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

    models = [m.id for m in client.models.list()]
    assert models == [model], models

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert c.choices[0].text, c
    assert c.choices[0].finish_reason in ("stop", "length"), c
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens >= 1, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert text, chat
    assert chat.usage.completion_tokens >= 1, chat.usage

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert streamed == text, (streamed, text)
    assert finish == chat.choices[0].finish_reason, (finish, chat.choices[0].finish_reason)
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    # A reply that ends its turn: the end-of-turn token's text (`<|im_end|>`) is never content,
    # streamed or not.
    short = [{"role": "user", "content": "What is 2+2?"}]
    done = client.chat.completions.create(
        model=model, messages=short, max_tokens=64, temperature=0
    )
    assert done.choices[0].finish_reason == "stop", done
    whole = done.choices[0].message.content
    assert whole and "<|" not in whole, whole
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=short, max_tokens=64, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert "".join(pieces) == whole, (pieces, whole)
    for reply in (c.choices[0].text, text, streamed):
        assert "<|" not in reply, reply

    lp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4
    )
    entries = lp.choices[0].logprobs.content
    assert entries, lp
    for e in entries:
        assert len(e.top_logprobs) == 4, e
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-4, e
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob, e
    assert "".join(e.token for e in entries) == lp.choices[0].message.content

    three = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, n=3
    )
    assert [c.index for c in three.choices] == [0, 1, 2], three
    assert len({c.message.content for c in three.choices}) == 1, three

    emb = client.embeddings.create(model=model, input=["red", "a longer sentence about colors"])
    assert [d.index for d in emb.data] == [0, 1], emb
    for d in emb.data:
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1.0) < 1e-4
    assert emb.usage.prompt_tokens >= 2, emb.usage

    structured(client, model)
    tool_round_trip(client, model)
    completions_extras(client, model)

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e

    print("ok")


if __name__ == "__main__":
    main()
