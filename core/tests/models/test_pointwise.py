"""The model's elementwise ops: eager definitions, routing through
``use_pointwise_ops`` (how fused versions get in), and the fallback when
torch.compile fails. The compiled kernels themselves run on the GPU
(benchmarks/profile_engine_step.py checks their greedy tokens)."""
import collections
import logging

import pytest
import torch

from kernelplane import select
from kernelplane.kv_cache import AttentionMetadata, allocate_plain_pages
from kernelplane.models import load_model
from kernelplane.models import pointwise
from kernelplane.models.pointwise import EAGER_OPS, PointwiseOps


def test_eager_ops_compute_the_textbook_formulas():
    gen = torch.Generator().manual_seed(0)
    x, delta, w = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen), torch.randn(32, generator=gen)
    rms = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    torch.testing.assert_close(pointwise.rms_norm(x, w, 1e-6), rms)
    residual, normed = pointwise.add_rms_norm(x, delta, w, 1e-6)
    torch.testing.assert_close(residual, x + delta)
    torch.testing.assert_close(normed, pointwise.rms_norm(x + delta, w, 1e-6))
    gate_up = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(pointwise.silu_mul(gate_up), torch.sigmoid(gate_up[:, :32]) * gate_up[:, :32] * gate_up[:, 32:])
    # RoPE by 0 is the identity; by any angle it keeps each pair's norm.
    q = torch.randn(5, 3, 16, generator=gen)
    zero = torch.zeros(5, 1, 8)
    torch.testing.assert_close(pointwise.apply_rope(q, zero.cos(), zero.sin()), q)
    angle = torch.rand(5, 1, 8, generator=gen) * 6
    r = pointwise.apply_rope(q, angle.cos(), angle.sin())
    torch.testing.assert_close(r[..., :8] ** 2 + r[..., 8:] ** 2, q[..., :8] ** 2 + q[..., 8:] ** 2)


def _forward(loaded, prompt_len: int = 7) -> torch.Tensor:
    cfg = loaded.config
    attention = select("attention", cfg.attention_request(dtype="float32", block_size=4), override="reference").implementation
    loaded.model.set_attention_backend(attention)
    caches = [allocate_plain_pages(8, 4, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim, torch.float32, "cpu")
              for _ in range(cfg.num_layers)]
    meta = AttentionMetadata.build([prompt_len], [prompt_len], [[3, 0]], 4, "cpu")
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return loaded.model(ids, torch.arange(prompt_len), caches, meta)


def test_every_layer_routes_through_the_ops_it_is_given(zoo):
    loaded = load_model(str(zoo.tiny_checkpoint("llama")), progress=False)  # a private copy: its ops change
    expected = _forward(loaded)
    calls = collections.Counter()

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return getattr(pointwise, name)(*args, **kwargs)
        return wrapper

    ops = PointwiseOps(*(counting(n) for n in ("add_rms_norm", "apply_rope", "silu_mul")), fused=True)
    loaded.model.use_pointwise_ops(ops)
    got = _forward(loaded)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = loaded.config.num_layers
    # Per layer: add + norm before the MLP and before the next layer (the final norm for the last);
    # the first layer's input norm has no residual to add.
    assert calls == {"add_rms_norm": 2 * layers, "apply_rope": layers, "silu_mul": layers}
    loaded.model.use_pointwise_ops(EAGER_OPS)
    calls.clear()
    _forward(loaded)
    assert not calls


def test_a_failing_compiler_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="kernelplane"):
        ops = pointwise.compiled_ops("cpu", torch.float32, hidden_size=32, head_dim=16)
    assert ops is EAGER_OPS
    assert "torch.compile of the pointwise ops failed" in caplog.text and "no C compiler found" in caplog.text


def test_a_miscompiled_op_is_rejected(monkeypatch):
    """The warm-up compares each compiled op with the eager one: a wrong result is not used."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: (lambda *a, **kw: (lambda r: r * 2 if torch.is_tensor(r) else r)(fn(*a, **kw))))
    assert pointwise.compiled_ops("cpu", torch.float32, hidden_size=32, head_dim=16) is EAGER_OPS


def test_compiled_ops_never_load_kernels_from_the_on_disk_caches(monkeypatch):
    """Kernels a later process loaded from inductor's caches crashed TurboQuant engines on an H100."""
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", True)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", True, raising=False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # no compiler needed for this check
    ops = pointwise.compiled_ops("cpu", torch.float32, hidden_size=32, head_dim=16)
    assert ops.fused
    assert torch._inductor.config.fx_graph_cache is False
    assert torch._functorch.config.enable_autograd_cache is False
