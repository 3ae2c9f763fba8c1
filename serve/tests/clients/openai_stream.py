"""Drives a running graft-serve with the official OpenAI Python client (as users do).

usage: openai_stream.py BASE_URL MODEL API_KEY
Streams a chat completion from MODEL, then asks the same without streaming, lists the models,
and prints one JSON line: {"streamed", "plain", "models", "finish_reason", "usage"}.
"""
import json
import sys

from openai import OpenAI

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url + "/v1", api_key=key)
messages = [{"role": "user", "content": "What is the capital of France?"}]
chunks = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0, max_tokens=16)
streamed, finish = "", None
for chunk in chunks:
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
models = [m.id for m in client.models.list().data]
print(json.dumps({"streamed": streamed, "plain": plain.choices[0].message.content, "models": models,
                  "finish_reason": finish, "usage": plain.usage.total_tokens}))
