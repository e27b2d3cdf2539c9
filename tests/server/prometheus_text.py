"""A strict reader of the Prometheus text exposition format, for the tests."""
from __future__ import annotations

import re


def parse_prometheus(text: str) -> dict:
    """A strict reader of the text exposition format: every family has HELP
    and TYPE before its samples, histogram buckets are cumulative and end at
    +Inf == _count. Returns {(name, sorted label pairs): value}."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$')
    types, helps, values = {}, set(), {}
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
        else:
            m = sample.match(line)
            assert m, f"not a valid sample line: {line!r}"
            name, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types and family in helps, f"sample before its HELP/TYPE: {line!r}"
            pairs = tuple(sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or "")))
            values[(name, pairs)] = float(value)
    for family, kind in types.items():
        if kind == "histogram":
            buckets = [(v, k) for k, v in values.items() if k[0] == family + "_bucket"]
            counts = [v for v, _ in sorted(buckets, key=lambda b: float(dict(b[1][1])["le"]))]
            assert counts == sorted(counts), f"{family}: buckets not cumulative"
            assert counts[-1] == values[(family + "_count", ())]
        if kind == "counter":
            assert family.endswith("_total"), family
    return values
