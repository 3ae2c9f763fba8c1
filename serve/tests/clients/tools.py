"""A tool-call round trip through the official OpenAI Python client.

usage: tools.py BASE_URL MODEL
1. asks with two tools and tool_choice "required": the answer must be a call (parsed by the
   client into message.tool_calls);
2. sends the call back with the tool's result and asks for the final answer;
3. streams a request with a named tool_choice and joins the streamed delta.tool_calls;
4. asks with tool_choice left at "auto" and reports whether the model called a tool.
Prints one JSON line with what each step returned.
"""
import json
import sys

from openai import OpenAI

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                    "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone",
     "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                    "required": ["zone"], "additionalProperties": False}}},
]
messages = [{"role": "user", "content": "What is the weather in Lima right now?"}]
first = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       temperature=0, max_tokens=60)
choice = first.choices[0]
calls = choice.message.tool_calls or []
out = {"finish_reason": choice.finish_reason,
       "calls": [{"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in calls]}
if calls:
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]})
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temperature_c": 19, "sky": "cloudy"})})
    second = client.chat.completions.create(model=model, messages=messages, tools=tools, temperature=0, max_tokens=40)
    out["answer"] = second.choices[0].message.content
    out["answer_finish"] = second.choices[0].finish_reason
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                                        tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                        temperature=0, max_tokens=60, stream=True)
streamed, finish, text = [], None, ""
for chunk in stream:
    if not chunk.choices:
        continue
    d = chunk.choices[0].delta
    for tc in d.tool_calls or []:
        streamed.append({"name": tc.function.name, "arguments": json.loads(tc.function.arguments)})
    text += d.content or ""
    finish = chunk.choices[0].finish_reason or finish
auto = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                      tools=tools, temperature=0, max_tokens=60)
out["auto_finish"] = auto.choices[0].finish_reason
out["auto_calls"] = [c.function.name for c in auto.choices[0].message.tool_calls or []]
out["streamed"] = streamed
out["streamed_text"] = text
out["streamed_finish"] = finish
print(json.dumps(out))
