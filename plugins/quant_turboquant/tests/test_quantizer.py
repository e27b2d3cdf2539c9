"""The KV-cache formats: layout, honest bytes, write/dequantize, selection."""
import pytest
import torch

from kernelplane import AttentionMetadata, KVQuantRequest, SelectionError, override_hardware, select
from kernelplane.reference.attention import gather_kv
from kernelplane.testing import KVQuantizerConformance
from kernelplane_quant_turboquant.quantizer import TurboQuantKVQuantizer


class TestConformance(KVQuantizerConformance):
    provider_name = "turboquant"
    # Relative round-trip error: sqrt(mse per unit vector) plus a margin.
    formats = {"turboquant2": 0.37, "turboquant3": 0.2, "turboquant4": 0.105}


def _quantizer(fmt="turboquant3", heads=2, dim=64, dim_v=None):
    return TurboQuantKVQuantizer(KVQuantRequest(format=fmt, num_kv_heads=heads, head_dim=dim, head_dim_v=dim_v,
                                                dtype="float32"))


@pytest.mark.parametrize("fmt, bits", [("turboquant2", 2), ("turboquant3", 3), ("turboquant4", 4)])
def test_bytes_per_token_are_the_real_bytes(fmt, bits):
    q = _quantizer(fmt, heads=8, dim=128)
    pages = q.allocate(4, 16, 8, 128, 128, "cpu")
    expected = 8 * 2 * (128 * bits // 8 + 2)  # K and V: codes + a float16 norm, per head
    assert q.bytes_per_token(8, 128, 128) == expected == pages.bytes_per_token()
    assert {n: t.dtype for n, t in pages.tensors.items()} == {
        "key_codes": torch.uint8, "key_norm": torch.float16, "value_codes": torch.uint8, "value_norm": torch.float16}
    # Leading dims follow the layout; storage is head-major within a page.
    assert pages.tensors["key_codes"].shape == (4, 16, 8, 128 * bits // 8)
    assert pages.tensors["key_norm"].shape == (4, 16, 8)
    assert pages.tensors["key_codes"].permute(0, 2, 1, 3).is_contiguous()
    assert pages.quantizer is q and pages.format == fmt


def test_write_then_dequantize_matches_the_codec():
    q = _quantizer(dim=64, dim_v=32)
    pages = q.allocate(3, 4, 2, 64, 32, "cpu")
    gen = torch.Generator().manual_seed(0)
    key, value = torch.randn(5, 2, 64, generator=gen), torch.randn(5, 2, 32, generator=gen)
    slots = torch.tensor([9, 0, 3, 4, 11])  # scattered over blocks 0..2
    q.write(pages, key, value, slots)
    k, v = q.dequantize(pages, torch.tensor([2, 0, 1]))
    assert k.shape == (3, 4, 2, 64) and v.shape == (3, 4, 2, 32)
    flat_k = torch.cat([k[1], k[2], k[0]]).reshape(12, 2, 64)  # blocks back in slot order
    flat_v = torch.cat([v[1], v[2], v[0]]).reshape(12, 2, 32)
    mu = key.mean(dim=0)  # keys are stored centred on the mean of the first write
    assert torch.allclose(q.key_offset(pages), mu)
    assert torch.allclose(flat_k[slots], q.key_codec.decode(*q.key_codec.encode(key - mu)) + mu, atol=1e-5)
    assert torch.allclose(flat_v[slots], q.value_codec.decode(*q.value_codec.encode(value)), atol=1e-5)


def test_another_rotation_draw_rotates_otherwise_and_codes_as_well():
    request = KVQuantRequest(format="turboquant3", num_kv_heads=2, head_dim=64, dtype="float32")
    usual, other = TurboQuantKVQuantizer(request), TurboQuantKVQuantizer(request, rotation_draw=1)
    for plane in ("key", "value"):
        a, b = usual.codec(plane).rotation.matrix("cpu"), other.codec(plane).rotation.matrix("cpu")
        assert (a - b).abs().max() > 0.1
    assert torch.equal(TurboQuantKVQuantizer(request).key_codec.rotation.matrix("cpu"),
                       usual.key_codec.rotation.matrix("cpu"))  # draw 0 is the engine's, every time
    x = torch.nn.functional.normalize(torch.randn(2000, 64, generator=torch.Generator().manual_seed(8)), dim=-1)
    errors = [((q.value_codec.decode(*q.value_codec.encode(x)) - x) ** 2).sum(-1).mean().item() for q in (usual, other)]
    assert errors[1] == pytest.approx(errors[0], rel=0.1)  # the codebook's error, whatever the draw


def test_key_centering_is_frozen_per_layer_and_cuts_the_error():
    gen = torch.Generator().manual_seed(3)
    common = torch.randn(2, 64, generator=gen) * 3  # a component all keys share, as in real models
    keys = [common + torch.randn(n, 2, 64, generator=gen) for n in (40, 8)]
    value = torch.randn(48, 2, 64, generator=gen)
    errors = {}
    for center in (True, False):
        q = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant3", num_kv_heads=2, head_dim=64), center_keys=center)
        pages = q.allocate(3, 16, 2, 64, 64, "cpu")
        q.write(pages, keys[0], value[:40], torch.arange(40))
        first = q.key_offset(pages)
        q.write(pages, keys[1], value[40:], torch.arange(40, 48))
        if center:
            assert torch.equal(q.key_offset(pages), first) and torch.allclose(first, keys[0].mean(0))
            other = q.allocate(3, 16, 2, 64, 64, "cpu")
            assert q.key_offset(other) is None  # each layer's pages get their own offset
        else:
            assert first is None
        k, _ = q.dequantize(pages, torch.arange(3))
        true = torch.cat(keys)
        errors[center] = ((k.reshape(48, 2, 64) - true).norm() / true.norm()).item()
    assert errors[True] < 0.5 * errors[False]


def test_reference_attention_reads_the_pages_through_dequantize():
    q = _quantizer()
    pages = q.allocate(2, 16, 2, 64, 64, "cpu")
    meta = AttentionMetadata.build([20], [20], [[1, 0]], 16)
    key = torch.randn(20, 2, 64)
    q.write(pages, key, torch.randn(20, 2, 64), meta.slot_mapping)
    k, _ = gather_kv(pages, torch.tensor([1, 0]))
    rel = ((k[:20] - key).norm() / key.norm()).item()
    assert 0.1 < rel < 0.2  # 3 bits: sqrt(0.034) ~ 0.18


def test_bad_input():
    q = _quantizer()
    with pytest.raises(ValueError, match="built for head dims 64/64"):
        q.allocate(2, 16, 2, 128, 128, "cpu")
    pages = q.allocate(2, 16, 2, 64, 64, "cpu")
    with pytest.raises(ValueError, match="need both key and value"):
        q.write(pages, torch.randn(1, 2, 64), None, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"key must be \[tokens, 2, 64\]"):
        q.write(pages, torch.randn(1, 3, 64), torch.randn(1, 3, 64), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown TurboQuant format"):
        _quantizer("turboquant7")


def test_selected_for_its_formats_only(fresh_registry):
    with override_hardware(device_type="cpu", triton_mode="unavailable"):
        sel = select("kv_quantizer", KVQuantRequest(format="turboquant4", num_kv_heads=2, head_dim=64))
        assert sel.chosen.name == "turboquant" and sel.chosen.plugin == "kernelplane-quant-turboquant"
        assert isinstance(sel.implementation, TurboQuantKVQuantizer)
        sel = select("kv_quantizer", KVQuantRequest(format="int8", num_kv_heads=2, head_dim=64))
        assert sel.chosen.name == "rtn"
        with pytest.raises(SelectionError, match=r"turboquant .*refused: head_dim 60 not supported \(a multiple of 32\)"):
            select("kv_quantizer", KVQuantRequest(format="turboquant2", num_kv_heads=2, head_dim=60))


def test_placeholder_writes_leave_the_offset_unset_and_the_buffer_stays_put():
    # CUDA graphs capture the subtraction of one buffer: it must exist from allocation on,
    # hold zeros until the first real write, and never be replaced.
    from kernelplane.kv_cache import placeholder_writes

    q = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant2", num_kv_heads=2, head_dim=64))
    pages = q.allocate(3, 16, 2, 64, 64, "cpu")
    buffer = q._offset_entry(pages).mu
    gen = torch.Generator().manual_seed(5)
    dummy = torch.randn(4, 2, 64, generator=gen) + 7.0
    with placeholder_writes():
        q.write(pages, dummy, dummy, torch.arange(44, 48))
    assert q.key_offset(pages) is None and torch.count_nonzero(buffer) == 0
    keys = torch.randn(20, 2, 64, generator=gen) + 2.0
    q.write(pages, keys, keys, torch.arange(20))
    assert q.key_offset(pages) is buffer and torch.allclose(buffer, keys.mean(0))
    q.write(pages, keys[:3] * 2, keys[:3], torch.arange(20, 23))  # later writes keep the offset
    assert q.key_offset(pages) is buffer and torch.allclose(buffer, keys.mean(0))


def test_the_engine_primes_the_offset_before_any_request():
    from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
    from kernelplane.models import load_model

    lm = load_model("default", device="cpu", dtype="float32", progress=False)
    offsets = []
    for first_prompt in ("Hello there", "def main():\n    return 0"):
        engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", kv_cache_dtype="turboquant3", max_model_len=128,
                                        attention_backend="reference", max_num_seqs=2, num_kv_blocks=32), loaded=lm)
        quantizer = engine.selections["kv_quantizer"].implementation
        before = [quantizer.key_offset(p).clone() for p in engine.kv_caches]
        out = engine.generate([first_prompt], SamplingParams(max_tokens=3, temperature=0))
        assert len(out[0].token_ids) == 3
        after = [quantizer.key_offset(p) for p in engine.kv_caches]
        assert all(torch.equal(a, b) for a, b in zip(before, after))  # the first request changed nothing
        offsets.append(before)
    # Set by the fixed priming text, so the same on every start whatever comes first.
    assert all(torch.equal(a, b) for a, b in zip(*offsets))


def test_with_the_tail_covering_every_position_the_engine_decodes_like_the_float_cache():
    """SmolLM2 on 2-bit pages: a tail longer than the sequences makes every read exact, so greedy tokens equal
    the float32 cache's; without the tail they do not (so the comparison can fail)."""
    from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
    from kernelplane.models import load_model

    lm = load_model("default", device="cpu", dtype="float32", progress=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def tokens(**kw):
        engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", max_model_len=96, attention_backend="reference",
                                        max_num_seqs=2, num_kv_blocks=24, **kw), loaded=lm)
        return [o.token_ids for o in engine.generate(prompts, greedy)]

    plain = tokens()
    assert tokens(kv_cache_dtype="turboquant2", kv_exact_tail=96) == plain
    assert tokens(kv_cache_dtype="turboquant2", kv_exact_tail=0) != plain
