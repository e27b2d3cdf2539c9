"""Models shared by the model, engine and spec tests, each built or loaded once per session.

Tiny checkpoints are randomly initialized transformers models saved with
``save_pretrained`` next to a small byte-level BPE tokenizer trained here;
weights are drawn with a large spread (and random norms and biases) so that
logits are far from uniform and greedy decoding has no near-ties. SmolLM2 is
the embedded GGUF, loaded both by kernelplane and by transformers.

Test folders load this file through ``load_zoo()`` in their conftest: it is a
plain module, not a package, and must be imported only once so that its
caches are shared.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Continuous batching admits new requests while others decode.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
    "Speculative decoding proposes draft tokens and verifies them exactly.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Le renard brun saute par-dessus le chien paresseux. Über die Brücke.",
] * 4

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# name -> (transformers config class name, model class name, config overrides)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),  # head_dim != hidden / heads
}

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="kernelplane-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def build_tokenizer(folder: Path, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer and save it as a transformers tokenizer (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TRAIN_TEXT, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if "embed_tokens" not in name else 4
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))


def make_checkpoint(folder: Path, name: str, seed: int = 0, **overrides) -> Path:
    """A tiny random ``name`` model (see ``TINY``) and the tokenizer, saved with save_pretrained."""
    import transformers

    config_cls, model_cls, extra = TINY[name]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    _randomize(model, seed)
    model.save_pretrained(folder)
    return folder


@functools.cache
def tiny_checkpoint(name: str) -> Path:
    return make_checkpoint(_root() / name, name)


@functools.cache
def tiny_hf(name: str):
    """The transformers model of ``tiny_checkpoint(name)``, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint(name), dtype=torch.float32).eval()


@functools.cache
def tiny_hf_tokenizer(name: str):
    # Not AutoTokenizer: for model_type qwen2, transformers 5 swaps in Qwen2Tokenizer's own
    # pre-tokenizer instead of the one in tokenizer.json; the file is the truth here.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint(name))


@functools.cache
def tiny_kp(name: str):
    """kernelplane's ``LoadedModel`` of ``tiny_checkpoint(name)``, float32."""
    from kernelplane.models import load_model

    return load_model(str(tiny_checkpoint(name)), progress=False)


def smollm2_path() -> Path:
    from kernelplane.models import resolve_model_path

    return resolve_model_path("default")


@functools.cache
def smollm2_kp():
    from kernelplane.models import load_model

    return load_model("default", progress=False)


@functools.cache
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@functools.cache
def smollm2_hf_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


_GREEDY_CACHE: dict[tuple, list[int]] = {}


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt: argmax every step (EOS included), never stopping early.

    Memoized (the zoo's models live for the session): SmolLM2 on CPU is slow
    and several test files ask for the same continuations.
    """
    key = (id(hf_model), tuple(prompt_ids), max_new_tokens)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = _hf_greedy(hf_model, prompt_ids, max_new_tokens)
    return list(_GREEDY_CACHE[key])


def _hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        generated = []
        while True:
            generated.append(int(out.logits[0, -1].argmax()))
            if len(generated) == max_new_tokens:
                return generated
            out = hf_model(input_ids=torch.tensor([generated[-1:]]), past_key_values=out.past_key_values, use_cache=True)


def kp_prefill_logits(loaded, prompt_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every prompt position from kernelplane's model, through the reference attention."""
    from kernelplane.capabilities import AttentionRequest
    from kernelplane.kv_cache import AttentionMetadata, allocate_plain_pages
    from kernelplane.reference.attention import ReferenceAttention

    mc, model = loaded.config, loaded.model
    n = len(prompt_ids)
    num_blocks = -(-n // block_size)
    request = AttentionRequest(num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                               dtype="float32", block_size=block_size)
    model.set_attention_backend(ReferenceAttention(request))
    caches = [allocate_plain_pages(num_blocks, block_size, mc.num_kv_heads, mc.head_dim, mc.head_dim, torch.float32, "cpu")
              for _ in range(mc.num_layers)]
    # Blocks in reverse order: the pages need not be contiguous.
    meta = AttentionMetadata.build([n], [n], [list(range(num_blocks))[::-1]], block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt_ids), torch.arange(n), caches, meta)
        return model.compute_logits(hidden)


def hf_prefill_logits(hf_model, prompt_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt_ids])).logits[0].float()


def write_gguf(name: str, path: Path, arch: str | None = None, f16: bool = False) -> Path:
    """``tiny_checkpoint(name)`` converted to a GGUF file the way llama.cpp lays it out.

    Llama's Q/K rows get llama.cpp's rotary permutation; the tokenizer goes in
    as a GPT-2 style vocabulary with merges. ``arch`` overrides the
    architecture written (to test refusal of unsupported ones).
    """
    import json

    import gguf
    import numpy as np

    hf, tok = tiny_hf(name), tiny_hf_tokenizer(name)
    c = hf.config
    arch = arch or c.model_type
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if c.rope_parameters.get("rope_type") == "llama3":
        # llama.cpp bakes Llama 3 scaling into one divisor per frequency (tensor rope_freqs).
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
        plain = 1.0 / (c.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        writer.add_tensor("rope_freqs.weight", (plain / scaled.double().numpy()).astype(np.float32))
    writer.add_vocab_size(c.vocab_size)
    merges = json.loads((tiny_checkpoint(name) / "tokenizer.json").read_text())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split rule
    writer.add_token_list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([3 if i in tok.all_special_ids else 1 for i in range(len(tok))])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's layout for Llama's rotary rows
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for hf_name, t in hf.state_dict().items():
        w = t.detach().float().numpy()
        if hf_name.startswith("model.layers."):
            _, _, layer, rest = hf_name.split(".", 3)
            out = f"blk.{layer}.{names[rest]}"
            if c.model_type == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = permute(w, heads if "q_proj" in rest else kv_heads)
        elif hf_name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[hf_name]
        if f16 and w.ndim == 2:
            w = w.astype(np.float16)
        writer.add_tensor(out, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
