"""The ``kernelplane`` command: plugins, explain, and (from the server
package) serve and generate."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .capabilities import AttentionRequest, Capability, KVQuantRequest, MoERequest, SpecRequest
from .selection import format_rows


def _print_plugins(args) -> int:
    from .explain import plugin_report

    report = plugin_report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for p in report["plugins"]:
        status = f"ERROR: {p['error']}" if p["error"] else ", ".join(p["hooks"])
        print(f"{p['distribution']} {p['version']}  [{p['name']}]  {status}")
        for prov in p["providers"]:
            print(f"    {prov['capability']:<14} {prov['name']:<16} priority {prov['priority']:<4} {prov['description']}")
    return 0


def _requests_from_args(args) -> dict:
    requests = {}
    if args.model:
        from .models import load_model_config  # the engine's model package

        cfg = load_model_config(args.model)
        requests[Capability.ATTENTION] = cfg.attention_request(dtype=args.dtype or "bfloat16", kv_cache_format=args.kv_cache_dtype)
        requests[Capability.KV_QUANTIZER] = KVQuantRequest(
            format=args.kv_cache_dtype if args.kv_cache_dtype != "auto" else "int8",
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    elif args.request:
        data = json.loads(args.request)
        cap = Capability(data.pop("capability", "attention"))
        requests[cap] = {Capability.ATTENTION: AttentionRequest, Capability.KV_QUANTIZER: KVQuantRequest,
                         Capability.MOE: MoERequest, Capability.SPEC_PROPOSER: SpecRequest}[cap](**data)
    elif args.kv_cache_dtype != "auto" or args.dtype:
        # The default model's shapes (``explain.DEFAULT_REQUESTS``) with the cache and dtype asked for.
        from .explain import DEFAULT_REQUESTS

        attention = DEFAULT_REQUESTS[Capability.ATTENTION]
        update = {"dtype": args.dtype} if args.dtype else {}
        if args.kv_cache_dtype != "auto":
            update["kv_cache_format"] = args.kv_cache_dtype
            requests[Capability.KV_QUANTIZER] = DEFAULT_REQUESTS[Capability.KV_QUANTIZER].model_copy(
                update={"format": args.kv_cache_dtype})
        requests[Capability.ATTENTION] = attention.model_copy(update=update)
    if args.speculative:
        requests[Capability.SPEC_PROPOSER] = SpecRequest(method=args.speculative)
    return requests


def _explain(args) -> int:
    from .explain import explain
    from .hardware import probe_hardware

    overrides = {}
    if args.attention_backend:
        overrides[Capability.ATTENTION] = args.attention_backend
    try:
        requests = _requests_from_args(args)
    except Exception as exc:
        print(f"kernelplane explain: {exc}", file=sys.stderr)
        return 2
    selections = explain(requests, overrides=overrides)
    if args.json:
        print(json.dumps({"hardware": probe_hardware().model_dump(),
                          "selections": {c.value: s.as_dict() for c, s in selections.items()}}, indent=2, default=str))
        return 0
    print(f"hardware: {probe_hardware().describe()}\n")
    for cap, sel in selections.items():
        chosen = sel.chosen.name if sel.chosen else "NONE (no candidate can run)"
        print(format_rows(sel.rows(), title=f"== {cap.value}: {chosen}" + (f"  (override {sel.override})" if sel.override else "")))
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelplane", description="Pluggable LLM-inference kernels, engine and server.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and their providers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_print_plugins)

    p = sub.add_parser("explain", help="show, per capability, every candidate, its verdict and the choice")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", help="model path (or 'default') whose needs to explain")
    p.add_argument("--request", help="a request as JSON, e.g. '{\"capability\": \"attention\", \"num_heads\": 32, \"num_kv_heads\": 8, \"head_dim\": 128}'")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--attention-backend", help="explicit attention provider (same rules as KERNELPLANE_ATTENTION_BACKEND)")
    p.add_argument("--speculative", help="speculative method to explain, e.g. ngram")
    p.set_defaults(func=_explain)

    try:  # serve / generate live with the engine
        from .server.commands import register as register_server_commands
    except ImportError:
        pass
    else:
        register_server_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
