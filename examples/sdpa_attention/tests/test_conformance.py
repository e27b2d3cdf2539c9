from kernelplane.testing import AttentionConformance


class TestSdpa(AttentionConformance):
    provider_name = "sdpa"


def test_decode_ignores_nan_in_unwritten_slots():
    """An engine's cache starts uninitialized: slots past a sequence's end may hold NaN."""
    import torch

    from kernelplane import AttentionMetadata, AttentionRequest
    from kernelplane.kv_cache import allocate_plain_pages, write_kv
    from kernelplane.reference.attention import ReferenceAttention
    from kernelplane_sdpa_example.backend import SdpaAttention

    gen = torch.Generator().manual_seed(0)
    request = AttentionRequest(num_heads=6, num_kv_heads=2, head_dim=32, dtype="float32", block_size=4)
    pages = allocate_plain_pages(12, 4, 2, 32, 32, torch.float32, "cpu")
    for t in pages.tensors.values():
        t.fill_(float("nan"))
    seq_lens, tables = [5, 1, 10], [[7, 2], [0], [3, 9, 11]]
    written = AttentionMetadata.build(seq_lens, seq_lens, tables, 4)
    n = sum(seq_lens)
    write_kv(pages, torch.randn(n, 2, 32, generator=gen), torch.randn(n, 2, 32, generator=gen), written.slot_mapping)
    meta = AttentionMetadata.build([1, 1, 1], seq_lens, tables, 4)
    query = torch.randn(3, 6, 32, generator=gen)
    out = SdpaAttention(request).forward(query, pages, meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ReferenceAttention(request).forward(query, pages, meta), rtol=1e-5, atol=1e-5)
