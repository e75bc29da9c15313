"""BERT encoder with pluggable (sparse) attention, and sentence embeddings.

Post-norm BERT (Devlin et al., https://arxiv.org/abs/1810.04805): word +
position + token-type embeddings -> LayerNorm, then blocks of
x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x)). Attention is bidirectional
`jsparse.attention.SparseAttention`, dense or planned by any
`SparseMethod` (per layer). `sentence_embedding` is the sentence-
transformers head of all-MiniLM-L6-v2: mean pooling, then L2 normalisation.
`from_safetensors` loads a Hugging Face BERT folder (model.safetensors,
config.json, tokenizer.json) without torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import attention
from jsparse.methods import base
from jsparse.models import weights


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Model hyperparameters (defaults: MiniLM-L6-H384).

  Attributes:
    vocab_size: V.
    num_layers: L encoder blocks.
    d_model: width F.
    num_heads: H.
    mlp_hidden: FFN width.
    max_positions: rows of the learned position table.
    type_vocab_size: token-type rows.
    norm_eps: LayerNorm epsilon.
    implementation: block-sparse op backend (None: best available).
  """

  vocab_size: int = 30522
  num_layers: int = 6
  d_model: int = 384
  num_heads: int = 12
  mlp_hidden: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  implementation: str | None = None

  @classmethod
  def from_hf_config(cls, hf: dict, **overrides) -> BertConfig:
    """The config of a Hugging Face `BertModel` config.json dict."""
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"unsupported activation {hf['hidden_act']!r}")
    fields = dict(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
        mlp_hidden=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        norm_eps=hf["layer_norm_eps"])
    fields.update(overrides)
    return cls(**fields)


class BertLayer(nnx.Module):
  """One post-norm encoder block."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    f = config.d_model
    self.attn = attention.SparseAttention(
        config.num_heads, f, implementation=config.implementation,
        rngs=rngs)
    self.attn_norm = nnx.LayerNorm(f, epsilon=config.norm_eps, rngs=rngs)
    self.up = nnx.Linear(f, config.mlp_hidden, rngs=rngs)
    self.down = nnx.Linear(config.mlp_hidden, f, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(f, epsilon=config.norm_eps, rngs=rngs)

  def __call__(self, x: jax.Array, *, layer: int) -> jax.Array:
    """[B, T, F] -> [B, T, F]."""
    if self.attn.method is None:
      a = self.attn(x)
    else:
      a = self.attn(x, method_context={"layer": layer})
    x = self.attn_norm(x + a)
    h = jax.nn.gelu(self.up(x), approximate=False)
    return self.mlp_norm(x + self.down(h))


class Bert(nnx.Module):
  """BERT encoder; attention per layer dense or planned by a SparseMethod.

  There is no padding mask: every row of a batch is a full sequence (embed
  sentences of different lengths one by one, as `embed_texts` does).
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    f = config.d_model
    self.word = nnx.Embed(config.vocab_size, f, rngs=rngs)
    self.position = nnx.Embed(config.max_positions, f, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, f, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(f, epsilon=config.norm_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(config, rngs=rngs)
                            for _ in range(config.num_layers)])

  def set_methods(self, methods: base.SparseMethod | None |
                  Sequence[base.SparseMethod | None]) -> None:
    """Plugs a method (or one per layer; None = dense) in place."""
    if methods is None or isinstance(methods, base.SparseMethod):
      methods = [methods] * len(self.layers)
    if len(methods) != len(self.layers):
      raise ValueError(f"need one method per layer ({len(self.layers)}), "
                       f"got {len(methods)}")
    for layer, method in zip(self.layers, methods):
      layer.attn.method = nnx.data(method)

  def __call__(self, tokens: jax.Array,
               token_types: jax.Array | None = None) -> jax.Array:
    """Token states.

    Args:
      tokens: int [B, T], T <= max_positions.
      token_types: int [B, T]; default zeros.

    Returns:
      f32 [B, T, F] last-layer hidden states.
    """
    t = tokens.shape[1]
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    x = (self.word(tokens) + self.position(jnp.arange(t))[None]
         + self.token_type(token_types))
    x = self.embed_norm(x)
    for i, layer in enumerate(self.layers):
      x = layer(x, layer=i)
    return x

  def sentence_embedding(self, tokens: jax.Array) -> jax.Array:
    """Mean-pooled, L2-normalised embeddings: int [B, T] -> f32 [B, F]."""
    pooled = self(tokens).mean(1)
    return pooled / jnp.maximum(
        jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def embed_texts(model: Bert, tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Sentence embeddings f32 [N, F], one forward pass per text.

  Args:
    model: the encoder.
    tokenizer: a `tokenizers.Tokenizer` (adds [CLS] ... [SEP]; no padding).
    texts: the sentences.
  """
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, x: nnx.merge(graphdef, state)
                .sentence_embedding(x))
  out = []
  for text in texts:
    ids = tokenizer.encode(text).ids[:model.config.max_positions]
    out.append(np.asarray(run(state, jnp.asarray([ids], jnp.int32)))[0])
  return np.stack(out)


def load_hf_params(model: Bert, tensors: dict[str, np.ndarray]) -> None:
  """Copies Hugging Face BertModel tensors ([out, in] Linear weights)."""
  cfg = model.config
  h, d = cfg.num_heads, cfg.d_model // cfg.num_heads

  def put(variable, value, name):
    value = np.asarray(value, np.float32)
    if variable.shape != value.shape:
      raise ValueError(f"{name}: expected {variable.shape}, got "
                       f"{value.shape}")
    variable[...] = jnp.asarray(value)

  def norm(module, name):
    put(module.scale, tensors[f"{name}.weight"], f"{name}.weight")
    put(module.bias, tensors[f"{name}.bias"], f"{name}.bias")

  def linear(module, name):
    put(module.kernel, tensors[f"{name}.weight"].T, f"{name}.weight")
    put(module.bias, tensors[f"{name}.bias"], f"{name}.bias")

  def heads_in(module, name):
    w = tensors[f"{name}.weight"].T.reshape(cfg.d_model, h, d)
    put(module.kernel, w, f"{name}.weight")
    put(module.bias, tensors[f"{name}.bias"].reshape(h, d), f"{name}.bias")

  e = "embeddings"
  put(model.word.embedding, tensors[f"{e}.word_embeddings.weight"], e)
  put(model.position.embedding, tensors[f"{e}.position_embeddings.weight"],
      e)
  put(model.token_type.embedding,
      tensors[f"{e}.token_type_embeddings.weight"], e)
  norm(model.embed_norm, f"{e}.LayerNorm")
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}"
    heads_in(layer.attn.query, f"{p}.attention.self.query")
    heads_in(layer.attn.key, f"{p}.attention.self.key")
    heads_in(layer.attn.value, f"{p}.attention.self.value")
    w = tensors[f"{p}.attention.output.dense.weight"].T.reshape(
        h, d, cfg.d_model)
    put(layer.attn.out.kernel, w, f"{p}.attention.output.dense.weight")
    put(layer.attn.out.bias, tensors[f"{p}.attention.output.dense.bias"],
        f"{p}.attention.output.dense.bias")
    norm(layer.attn_norm, f"{p}.attention.output.LayerNorm")
    linear(layer.up, f"{p}.intermediate.dense")
    linear(layer.down, f"{p}.output.dense")
    norm(layer.mlp_norm, f"{p}.output.LayerNorm")


def from_safetensors(folder: str, **overrides):
  """Builds a Bert from a Hugging Face folder.

  Args:
    folder: holds model.safetensors, config.json and tokenizer.json.
    **overrides: BertConfig fields to override (e.g. implementation).

  Returns:
    (model, tokenizer): the Bert with loaded weights and its
    `tokenizers.Tokenizer`, unpadded, truncating as sentence-transformers.
  """
  with open(os.path.join(folder, "config.json")) as f:
    config = BertConfig.from_hf_config(json.load(f), **overrides)
  model = Bert(config, rngs=nnx.Rngs(0))
  load_hf_params(model, weights.read_safetensors(
      os.path.join(folder, "model.safetensors")))
  tokenizer = weights.read_tokenizer(os.path.join(folder, "tokenizer.json"))
  # tokenizer.json pads to 128 tokens; sentence-transformers truncates at
  # sentence_bert_config.json's max_seq_length and never pads one text.
  tokenizer.no_padding()
  st_config = os.path.join(folder, "sentence_bert_config.json")
  if os.path.exists(st_config):
    with open(st_config) as f:
      tokenizer.enable_truncation(json.load(f)["max_seq_length"])
  return model, tokenizer
