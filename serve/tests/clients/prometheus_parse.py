"""Parses a Prometheus text exposition (a file path argument) with prometheus_client's parser,
the reference implementation, and prints its samples as one JSON line."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

text = open(sys.argv[1]).read()
samples = []
for family in text_string_to_metric_families(text):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name,
                        "labels": s.labels, "value": s.value})
print(json.dumps({"samples": samples}))
