"""The fused quantize-on-write kernel against the PyTorch path (codec.encode + scatter)."""
import os

import pytest
import torch

from kernelplane import KVQuantRequest
from kernelplane_quant_turboquant import write_kernel
from kernelplane_quant_turboquant.quantizer import TurboQuantKVQuantizer

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt,dim,norm_mode,prerotate", [
    ("turboquant2", 64, None, False), ("turboquant3", 64, None, False), ("turboquant4", 128, None, False),
    ("turboquant3", 64, "length", False), ("turboquant2", 64, None, True), ("turboquant3", 128, None, True)])
def test_fused_write_stores_what_the_codec_stores(fmt, dim, norm_mode, prerotate, monkeypatch):
    # prerotate: the rotation as one product before the kernel, as large writes do
    monkeypatch.setattr(write_kernel, "PREROTATE_MIN_WORK", 0 if prerotate else 1 << 62)
    heads, tokens, block = 2, 37, 16
    slots = torch.randperm(5 * block, generator=torch.Generator().manual_seed(11))[:tokens].to(DEVICE)
    pages = {}
    for fused in (False, True):
        q = TurboQuantKVQuantizer(KVQuantRequest(format=fmt, num_kv_heads=heads, head_dim=dim), norm_mode=norm_mode,
                                  fused_write=fused)
        p = q.allocate(5, block, heads, dim, dim, DEVICE)
        for t in p.tensors.values():  # garbage where nothing is written
            t.copy_(torch.randint(0, 255, t.shape, generator=torch.Generator().manual_seed(1)).to(t.dtype))
        g = torch.Generator().manual_seed(2)
        key = (torch.randn(tokens, heads, dim, generator=g) * 3 + 1.5).to(DEVICE, torch.bfloat16)
        value = torch.randn(tokens, heads, dim, generator=g).to(DEVICE)
        q.write(p, key, value, slots)
        q.write(p, key[:3] * 0.5, value[:3], slots[:3])  # overwrite: later writes reuse the first offset
        pages[fused] = (q, p)
    (q0, p0), (q1, p1) = pages[False], pages[True]
    assert torch.equal(q0.key_offset(p0), q1.key_offset(p1))
    for plane in ("key", "value"):
        c0, c1 = p0.tensors[f"{plane}_codes"], p1.tensors[f"{plane}_codes"]
        n0, n1 = p0.tensors[f"{plane}_norm"].float(), p1.tensors[f"{plane}_norm"].float()
        differing_bytes = (c0 != c1).float().mean().item()
        assert differing_bytes < 0.01, f"{plane}: {differing_bytes:.3%} of code bytes differ"  # threshold ties only
        # A tie flips one coordinate's code, and the norm fitted to the codes moves with it
        # (about 1 %, H200): compare the norms of vectors coded alike.
        alike = (c0 == c1).all(-1)
        assert torch.allclose(n0[alike], n1[alike], rtol=2e-3, atol=1e-3), f"{plane} norms differ"
    k0, v0 = q0.dequantize(p0, torch.arange(5, device=DEVICE))
    k1, v1 = q1.dequantize(p1, torch.arange(5, device=DEVICE))
    for a, b in ((k0, k1), (v0, v1)):
        written = torch.isfinite(a) & torch.isfinite(b)
        assert ((a - b)[written].norm() / a[written].norm()).item() < 0.02


def test_fused_write_skips_empty_batches_and_names_bad_shapes():
    q = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant2", num_kv_heads=2, head_dim=64), fused_write=True)
    p = q.allocate(2, 16, 2, 64, 64, DEVICE)
    before = {k: t.clone() for k, t in p.tensors.items()}
    q.write(p, torch.empty(0, 2, 64, device=DEVICE), torch.empty(0, 2, 64, device=DEVICE),
            torch.empty(0, dtype=torch.long, device=DEVICE))
    assert all(torch.equal(before[k], p.tensors[k]) for k in before)
    with pytest.raises(ValueError, match=r"value must be \[tokens, 2, 64\]"):
        q.write(p, torch.randn(1, 2, 64, device=DEVICE), torch.randn(1, 2, 32, device=DEVICE),
                torch.zeros(1, dtype=torch.long, device=DEVICE))


def test_fused_write_is_the_default_only_where_triton_compiles_and_the_dims_fit(monkeypatch):
    from types import SimpleNamespace

    import kernelplane_quant_turboquant.quantizer as quantizer_module

    def quantizer(head_dim, mode, **kw):
        monkeypatch.setattr(quantizer_module, "probe_hardware", lambda: SimpleNamespace(triton_mode=mode))
        return TurboQuantKVQuantizer(KVQuantRequest(format="turboquant3", num_kv_heads=2, head_dim=head_dim), **kw)

    monkeypatch.delenv("KERNELPLANE_TURBOQUANT_FUSED_WRITE", raising=False)
    assert quantizer(64, "compiled")._fused_by_default
    assert not quantizer(64, "interpreter")._fused_by_default
    assert not quantizer(96, "compiled")._fused_by_default  # tiles of 96 / 4 = 24: not a power of two
    monkeypatch.setenv("KERNELPLANE_TURBOQUANT_FUSED_WRITE", "0")
    assert not quantizer(64, "compiled")._fused_by_default
    with pytest.raises(ValueError, match="powers of two, got 96/96"):
        quantizer(96, "compiled", fused_write=True)


@pytest.mark.parametrize("prerotate", [False, True])
def test_fused_write_fills_the_exact_tail_like_the_pytorch_path(prerotate, monkeypatch):
    from kernelplane import AttentionMetadata
    from kernelplane.exact_tail import ExactTail
    from kernelplane.kv_cache import write_kv

    monkeypatch.setattr(write_kernel, "PREROTATE_MIN_WORK", 0 if prerotate else 1 << 62)
    heads, dim, block = 2, 64, 16
    # Two prompts, then a decode step: some rows have a place in the tail, the rest go to the scratch slot.
    prompt = AttentionMetadata.build([30, 7], [30, 7], [[0, 1], [2]], block, DEVICE, seq_slots=[2, 0])
    decode = AttentionMetadata.build([1, 1], [31, 8], [[0, 1], [2]], block, DEVICE, seq_slots=[2, 0])
    g = torch.Generator().manual_seed(5)
    rows = [(torch.randn(n, heads, dim, generator=g) * 2 + 1).to(DEVICE, torch.bfloat16) for n in (37, 2, 37, 2)]
    tails = {}
    for fused in (False, True):
        q = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant3", num_kv_heads=heads, head_dim=dim),
                                  fused_write=fused)
        pages = q.allocate(4, block, heads, dim, dim, DEVICE)
        pages.exact_tail = ExactTail.allocate(8, 3, heads, dim, dim, torch.bfloat16, DEVICE)
        write_kv(pages, rows[0], rows[2], prompt.slot_mapping, prompt)
        write_kv(pages, rows[1], rows[3], decode.slot_mapping, decode)
        tails[fused] = pages.exact_tail
        # What the tail holds is R_k (k - mu) and R_v v, read back by the reference path.
        k, v = q.from_exact_tail(pages, pages.exact_tail.key[2, 0], pages.exact_tail.value[2, 0])
        torch.testing.assert_close(k, rows[0][0].float(), rtol=0.02, atol=0.05)
        torch.testing.assert_close(v, rows[2][0].float(), rtol=0.02, atol=0.05)
    for plane in ("key", "value"):
        a, b = getattr(tails[False], plane)[:3], getattr(tails[True], plane)[:3]  # slot 3 is the scratch
        assert torch.count_nonzero(a) > 0
        torch.testing.assert_close(a.float(), b.float(), rtol=0.01, atol=0.02)
