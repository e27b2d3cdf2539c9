"""The exact tail beside a quantized cache (kernelplane.exact_tail)."""
import pytest
import torch

from kernelplane import AttentionMetadata, AttentionRequest, KVQuantRequest
from kernelplane.exact_tail import MAX_DRAFT_SLACK, ExactTail
from kernelplane.kv_cache import allocate_plain_pages, write_kv
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.reference.kv_quant import RoundToNearestKVQuantizer

HEADS, DIM = 2, 8


def _tagged(positions: list[int]) -> torch.Tensor:
    """One K/V row per position, every element equal to its position (so a read tells what was written)."""
    return torch.tensor(positions, dtype=torch.float32)[:, None, None].expand(-1, HEADS, DIM).contiguous()


class _Writer:
    """Feeds ``ExactTail.write`` the way the engine would, for one sequence in slot ``slot``."""

    def __init__(self, tail: ExactTail, slot: int):
        self.tail, self.slot, self.length = tail, slot, 0

    def step(self, num_tokens: int, rejected: int = 0) -> None:
        """Write ``num_tokens`` new positions; the last ``rejected`` are drafts that do not stay."""
        start = self.start = self.length
        end = self.end = start + num_tokens
        meta = AttentionMetadata.build([num_tokens], [end], [[0] * (end // 4 + 1)], 4, seq_slots=[self.slot])
        rows = _tagged(list(range(start, end)))
        self.tail.write(meta, rows, -rows)
        self.length = end - rejected


@pytest.mark.parametrize("window", [1, 5, 16])
def test_every_read_finds_the_first_and_latest_positions_it_promises(window):
    tail = ExactTail.allocate(window, num_slots=3, num_kv_heads=HEADS, head_dim=DIM, head_dim_v=DIM,
                              dtype=torch.float32, device="cpu")
    assert tail.capacity == window + MAX_DRAFT_SLACK
    writer = _Writer(tail, slot=1)
    # A chunked prompt longer than the ring, decode steps, then verification steps whose drafts are rejected.
    plan = [(37, 0), (29, 0)] + [(1, 0)] * 7 + [(1 + 16, 16), (1 + 9, 3), (1 + 16, 12)] + [(1, 0)] * 3
    for num_tokens, rejected in plan:
        writer.step(num_tokens, rejected)
        # What the step's own queries see, at its full length (drafts included).
        positions = tail.entry_positions(torch.tensor([writer.end], dtype=torch.int32))[0]
        held = sorted(p for p in positions.tolist() if p >= 0)
        assert held == [0] + list(range(max(writer.end - tail.capacity, 1), writer.end))
        read = tail.reads_exact(positions.clamp(min=0), torch.arange(writer.start, writer.end), positions >= 0)
        for entry, pos in enumerate(positions.tolist()):
            if read[:, entry].any():  # read by some query: must hold what was written at that position
                assert torch.all(tail.key[1, entry] == pos) and torch.all(tail.value[1, entry] == -pos)
        # Every query reads position 0 and its own latest `window` positions exact.
        for i, q in enumerate(range(writer.start, writer.end)):
            got = sorted(positions[read[i] & (positions <= q)].tolist())  # causal masking is the backend's
            assert got == sorted({0} | (set(range(max(q - window + 1, 1), q + 1)) & set(held)))
            if q - window + 1 >= writer.end - tail.capacity:  # the ring reaches back far enough
                assert got == sorted({0} | set(range(max(q - window + 1, 1), q + 1)))
    assert torch.all(tail.key[0] == 0) and torch.all(tail.key[2] == 0)  # other slots untouched


def test_rows_without_a_place_go_to_the_scratch_slot():
    tail = ExactTail.allocate(2, num_slots=1, num_kv_heads=HEADS, head_dim=DIM, head_dim_v=DIM,
                              dtype=torch.float32, device="cpu")
    meta = AttentionMetadata.build([40], [40], [[0] * 10], 4, seq_slots=[0])
    index = tail.write_index(meta)
    entries = tail.capacity + 1
    assert index[0] == 0  # position 0 -> its own entry
    # Only the last `capacity` positions (and position 0) have a place; the rest land in the scratch slot.
    assert torch.all(index[1:40 - tail.capacity] == tail.scratch_slot * entries)
    assert torch.all(index[40 - tail.capacity:] < entries)


def _int8_pages(num_blocks: int, window: int):
    quantizer = RoundToNearestKVQuantizer(KVQuantRequest(format="int8", num_kv_heads=HEADS, head_dim=DIM,
                                                         dtype="float32", block_size=4))
    pages = quantizer.allocate(num_blocks, 4, HEADS, DIM, DIM, "cpu")
    pages.exact_tail = ExactTail.allocate(window, num_slots=2, num_kv_heads=HEADS, head_dim=DIM, head_dim_v=DIM,
                                          dtype=torch.float32, device="cpu")
    return pages


def test_reference_attention_reads_the_exact_tail_over_quantized_pages():
    gen = torch.Generator().manual_seed(3)
    n, window = 30, 6
    key, value = torch.randn(n, HEADS, DIM, generator=gen) * 3, torch.randn(n, HEADS, DIM, generator=gen)
    query = torch.randn(n, 2 * HEADS, DIM, generator=gen)
    table = [list(range(8))]
    request = AttentionRequest(num_heads=2 * HEADS, num_kv_heads=HEADS, head_dim=DIM, dtype="float32",
                               kv_cache_format="int8", block_size=4)
    plain = allocate_plain_pages(8, 4, HEADS, DIM, DIM, torch.float32, "cpu")
    exact_meta = AttentionMetadata.build([n], [n], table, 4)
    write_kv(plain, key, value, exact_meta.slot_mapping)

    def run(window: int, slotted: bool):
        pages = _int8_pages(8, window)
        meta = AttentionMetadata.build([n], [n], table, 4, seq_slots=[1] if slotted else None)
        write_kv(pages, key, value, meta.slot_mapping, meta)
        return pages, ReferenceAttention(request).forward(query, pages, meta)

    exact = ReferenceAttention(request).forward(query, plain, exact_meta)
    # A tail as long as the sequence: every position exact, whatever the pages hold.
    _, whole = run(n, slotted=True)
    torch.testing.assert_close(whole, exact, rtol=1e-5, atol=1e-5)
    # Without slots the tail is neither written nor read: the pages alone.
    pages, unslotted = run(window, slotted=False)
    assert torch.all(pages.exact_tail.key == 0)
    quantized_error = (unslotted - exact).abs().max()
    assert quantized_error > 1e-3
    # A short tail: the last query (decode-like, it sees the whole tail) is closer to exact than with no tail.
    _, partial = run(window, slotted=True)
    assert (partial[-1] - exact[-1]).abs().max() < (unslotted[-1] - exact[-1]).abs().max()
    # And what it computes, query by query: position 0 and the query's own latest `window` keys exact where
    # the ring still holds them (its last `capacity` positions), the pages' dequantized K/V elsewhere.
    k, v = pages.quantizer.dequantize(pages, torch.arange(8))
    k, v = k.flatten(0, 1)[:n], v.flatten(0, 1)[:n]
    ring_start = n - pages.exact_tail.capacity
    for p in range(n):
        exact = [j == 0 or (j > p - window and j >= ring_start) for j in range(p + 1)]
        rows = torch.stack([key[j] if e else k[j] for j, e in enumerate(exact)])
        vals = torch.stack([value[j] if e else v[j] for j, e in enumerate(exact)])
        q = query[p].view(HEADS, 2, DIM)  # query head 2 h + g reads KV head h
        weights = torch.softmax(torch.einsum("hgd,jhd->hgj", q, rows) / DIM ** 0.5, dim=-1)
        expected = torch.einsum("hgj,jhd->hgd", weights, vals).reshape(2 * HEADS, DIM)
        torch.testing.assert_close(partial[p], expected, rtol=1e-4, atol=1e-5)


def test_allocate_names_bad_sizes():
    with pytest.raises(ValueError, match="window"):
        ExactTail.allocate(0, 1, HEADS, DIM, DIM, torch.float32, "cpu")
    with pytest.raises(ValueError, match="slot"):
        ExactTail.allocate(4, 0, HEADS, DIM, DIM, torch.float32, "cpu")
    with pytest.raises(ValueError, match="seq_slots"):
        AttentionMetadata.build([1, 1], [1, 1], [[0], [1]], 4, seq_slots=[0])
