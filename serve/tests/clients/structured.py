"""Structured outputs through the official OpenAI Python client, checked with jsonschema.

usage: structured.py BASE_URL MODEL COUNT
Sends COUNT chat requests with random prompts (seeded) and a `json_schema` response format,
concurrently (the server batches them), and validates every answer against the schema with
jsonschema; prints one JSON line: {"requests", "valid", "finish_reasons", "invalid"}.
"""
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
from openai import OpenAI

base_url, model, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = OpenAI(base_url=base_url + "/v1", api_key="unused")
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "kind": {"type": "string", "enum": ["city", "person", "animal", "thing"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "kind", "rating", "tags"],
    "additionalProperties": False,
}
rng = random.Random(20261202)
words = ("river mountain teacher lighthouse violin comet garden robot harbor desert lantern "
         "falcon library engine meadow glacier bakery orbit canyon whale").split()


def ask(i):
    subject = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Describe {subject} as a JSON record."}],
        response_format={"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}},
        temperature=0.9, seed=i, max_tokens=120)
    return r.choices[0].finish_reason, r.choices[0].message.content


with ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(ask, range(count)))
valid, invalid, reasons = 0, [], {}
for reason, text in answers:
    reasons[reason] = reasons.get(reason, 0) + 1
    try:
        jsonschema.validate(json.loads(text), schema)
        valid += 1
    except Exception as e:  # a parse or validation failure: report the text
        invalid.append({"text": text, "error": str(e)[:200]})
print(json.dumps({"requests": count, "valid": valid, "finish_reasons": reasons, "invalid": invalid[:3]}))
