"""check_kernel_inputs: the shared checks hand-written attention kernels rely on."""
import pytest
import torch

from kernelplane import AttentionMetadata, AttentionRequest
from kernelplane.kv_cache import allocate_plain_pages, check_kernel_inputs

REQUEST = AttentionRequest(num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32", block_size=4)


def inputs():
    pages = allocate_plain_pages(4, 4, 2, 16, 16, torch.float32, "cpu")
    meta = AttentionMetadata.build([1, 2], [3, 6], [[0], [1, 2]], 4)
    return torch.randn(3, 4, 16), pages, meta


def test_consistent_inputs_pass():
    check_kernel_inputs(*inputs(), REQUEST)


@pytest.mark.parametrize("spoil, message", [
    (lambda q, p, m: (q[:, :3], p, m), r"query must be \[tokens, 4, 16\]"),
    (lambda q, p, m: (q.transpose(1, 2).contiguous().transpose(1, 2), p, m), "last dim must be contiguous"),
    (lambda q, p, m: (q, allocate_plain_pages(4, 4, 1, 16, 16, torch.float32, "cpu"), m), "KV pages hold 1 heads"),
    (lambda q, p, m: (q, p, AttentionMetadata(**{**m.__dict__, "seq_lens": m.seq_lens.long()})), "seq_lens must be int32"),
    (lambda q, p, m: (q, p, AttentionMetadata(**{**m.__dict__, "query_start_loc": m.query_start_loc[:2]})),
     "num_seqs \\+ 1 entries"),
])
def test_each_mismatch_is_named(spoil, message):
    with pytest.raises(ValueError, match=message):
        check_kernel_inputs(*spoil(*inputs()), REQUEST)
