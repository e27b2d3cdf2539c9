"""OpenAI-compatible HTTP server over the async engine.

- ``app.create_app(engine, served_model_name, api_key)``: the FastAPI app
  (/v1/models, /v1/completions, /v1/chat/completions, /v1/kernels, /health, /metrics).
- ``protocol``: request bodies (pydantic); ``responses``: OpenAI response shapes;
  ``errors``: OpenAI error bodies and statuses; ``generation``: running a call's
  requests on the engine (streams, aborts on disconnect); ``metrics``: Prometheus text.
- ``commands``: the ``kernelplane serve`` and ``kernelplane generate`` subcommands.
"""
