"""`kernelplane serve` and `kernelplane generate`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from ..selection import SelectionError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="a .gguf file, a Hugging Face checkpoint folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache size in blocks (default: sized from memory)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention-backend", help="explicit attention provider (same rules as KERNELPLANE_ATTENTION_BACKEND)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, float16, bfloat16, int8, fp8, turboquant2/3/4, ...")
    p.add_argument("--kv-exact-tail", type=int, default=None, metavar="N",
                   help="quantized KV caches: keep each running sequence's first and latest N tokens unquantized "
                        "(default 64; 0 turns it off)")
    p.add_argument("--speculative", metavar="METHOD", help="speculative decoding method, e.g. ngram")
    p.add_argument("--num-speculative-tokens", type=int)
    p.add_argument("--speculative-config", help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'')
    p.add_argument("--strict", action="store_true", help="a backend that fails to build is an error, not a fallback")
    p.add_argument("--enforce-eager", action="store_true",
                   help="GPU: run plain PyTorch (no CUDA graphs, no torch.compile fusion); slower, for debugging")


def _speculative_settings(args) -> tuple[Optional[str], Optional[int], dict]:
    """(method, k, options) from --speculative-config, where --speculative / --num-speculative-tokens win."""
    spec: dict = {}
    if args.speculative_config:
        try:
            spec = json.loads(args.speculative_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict) or not (spec.get("method") or args.speculative):
            raise ValueError('--speculative-config must be a JSON object with a "method", e.g. '
                             '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
    method = args.speculative or spec.pop("method", None)
    spec.pop("method", None)
    k = args.num_speculative_tokens or spec.pop("num_speculative_tokens", None)
    spec.pop("num_speculative_tokens", None)
    if k is not None and method is None:
        raise ValueError("--num-speculative-tokens needs a method: --speculative METHOD (e.g. ngram)")
    return method, k, spec


def engine_config_from_args(args):
    from ..engine import EngineConfig

    method, k, options = _speculative_settings(args)
    kwargs = dict(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                  max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
                  kv_cache_dtype=args.kv_cache_dtype, speculative_method=method, speculative_options=options,
                  strict=args.strict, enforce_eager=args.enforce_eager)
    if k is not None:
        kwargs["num_speculative_tokens"] = k
    if args.kv_exact_tail is not None:
        kwargs["kv_exact_tail"] = args.kv_exact_tail
    return EngineConfig(**kwargs)


def _build_engine(args):
    from ..engine import LLMEngine
    from ..models import ModelLoadError

    try:
        return LLMEngine(engine_config_from_args(args))
    except (SelectionError, ModelLoadError, ValueError) as exc:  # bad flags or model: say why, no traceback
        print(f"kernelplane: {exc}", file=sys.stderr)
    return None


def _log_selection(engine) -> None:
    """The start-up kernel table: per capability, every candidate, its verdict and why."""
    from ..hardware import probe_hardware
    from ..selection import format_rows

    print(f"hardware: {probe_hardware().describe()}", file=sys.stderr)
    for cap, sel in engine.selections.items():
        override = f"  (override {sel.override})" if sel.override else ""
        print(format_rows(sel.rows(), title=f"== {cap}: {sel.chosen.name}{override}"), file=sys.stderr)


def _serve(args) -> int:
    import uvicorn

    from ..engine import AsyncLLMEngine
    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("kernelplane")
    engine = _build_engine(args)
    if engine is None:
        return 2
    _log_selection(engine)
    async_engine = AsyncLLMEngine(engine=engine)
    async_engine.start()
    app = create_app(async_engine, served_model_name=args.served_model_name or args.model, api_key=args.api_key)
    log.info("serving %s on http://%s:%d (OpenAI API under /v1)", args.model, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        async_engine.shutdown()
    return 0


def _generate(args) -> int:
    from ..engine import SamplingParams

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    engine = _build_engine(args)
    if engine is None:
        return 2
    try:
        prompt = args.prompt
        if args.chat:
            rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt = engine.tokenize_prompt(rendered, add_special_tokens=False)  # the template wrote them
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)
        request_id = engine.add_request(None, prompt, params)
    except ValueError as exc:  # a bad sampling flag, a prompt too long, no chat template
        print(f"kernelplane: {exc}", file=sys.stderr)
        return 2
    final = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
                if out.finished and out.request_id == request_id:
                    final = out
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    m = final.metrics if final is not None else {}
    if m.get("num_spec_steps"):
        print(f"speculative: {m['num_accepted_tokens']}/{m['num_draft_tokens']} drafts accepted in "
              f"{m['num_spec_steps']} verification steps", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients use (default: the --model value)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.set_defaults(func=_serve)

    p = sub.add_parser("generate", help="complete one prompt offline; prints only the generated text")
    _engine_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.set_defaults(func=_generate)
