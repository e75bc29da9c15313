"""SEA: stretch rule, selection vs brute force, sparse attention vs dense."""

from __future__ import annotations

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jsparse.methods import sea
from pallas_kernels import row_layout
from tests import jaxpr_size
from tests import tolerances
from tests.jsparse.methods import method_test_base as mtb

_B, _T, _H, _D = 1, 64, 2, 8
_CFG = sea.SEAConfig(predictor_len=16, topk=8, max_positions=_T,
                     output="sparse")


def _plan(method, q, k, v):
  return nnx.jit(lambda m, q, k, v: m.plan(q, k, v))(method, q, k, v)


def _brute_keys(est, topk, causal, capacity):
  """Per (b, h, t) the set of listed keys, by loops and stable sorts.

  Grouped top-k over (H, T_M) per row (causal) or over (H, T, T_M) per
  sample, then per head the best floor(capacity / R_t) selected cells that
  own a key (R_t: the row's longest run), then their runs.
  """
  b, h, t, tm = est.shape
  rows = np.arange(1, t + 1) if causal else np.full(t, t)
  owners = np.asarray(jax.jit(sea.owner_cell, static_argnums=2)(
      np.arange(t)[None], rows[:, None], tm))
  out = np.empty((b, h, t), object)
  for bi in range(b):
    flat = est[bi].reshape(-1)
    order = np.argsort(-flat, kind="stable")[:min(h * topk * tm, flat.size)]
    batch_sel = np.zeros(flat.size, bool)
    batch_sel[order] = True
    batch_sel = batch_sel.reshape(h, t, tm)
    for ti in range(t):
      owner = owners[ti, :rows[ti]]
      runs = np.bincount(owner, minlength=tm)
      cells = min(capacity // runs.max(), tm)
      if causal:
        budget = int(np.clip(np.round(h * topk * tm / (ti + 1.0)), 1,
                             h * tm))
        row = est[bi, :, ti].reshape(-1)
        sel = np.zeros(h * tm, bool)
        sel[np.argsort(-row, kind="stable")[:budget]] = True
        sel = sel.reshape(h, tm)
      else:
        sel = batch_sel[:, ti]
      for hi in range(h):
        best = [c for c in np.argsort(-est[bi, hi, ti], kind="stable")
                if sel[hi, c] and runs[c]][:cells]
        out[bi, hi, ti] = set(np.flatnonzero(np.isin(owner, best)).tolist())
  return out


def _listed_keys(layout, t):
  """Per (b, h, t) the set of keys a RowLayout lists."""
  idx = np.asarray(layout.kv_idx)
  listed = np.asarray(layout.listed())[..., 0, :]
  out = np.empty(idx.shape[:3], object)
  for pos in np.ndindex(*idx.shape[:3]):
    keys = idx[pos][listed[pos]].tolist()
    assert len(set(keys)) == len(keys), f"repeated key in list {pos}"
    out[pos] = set(keys)
  assert out.shape[2] == t
  return out


class SEATest(mtb.MethodTestBase):

  TRAINS = True  # the student is fine-tuned through the sparse attention

  def make_method(self):
    return sea.SEAMethod(_CFG, _H, _D, rngs=nnx.Rngs(0))

  def dense_method(self):
    # T_M = T and a budget covering every cell: all keys kept.
    cfg = sea.SEAConfig(predictor_len=_T, topk=_T, max_positions=_T,
                        output="sparse")
    return sea.SEAMethod(cfg, _H, _D, rngs=nnx.Rngs(0))

  def inputs(self, method):
    q, k, self.v = mtb.random_qkv(4, _B, _T, _T, _H, _H, _D)
    return q, k, self.v, {}

  def logical_mask(self, method, q, k, kwargs):
    plan = _plan(method, q, k, self.v)
    return sea.element_mask(plan.aux["selected"], k.shape[1], True)

  def dense_mask(self, method, q, k, kwargs):
    return np.tril(np.ones((1, 1, _T, _T), bool))

  def test_plan_well_formed(self):
    # RowLayout [B, H, T, Kmax]: distinct causal keys, exactly the runs of
    # the selected cells.
    method = self.make_method()
    q, k, v, _ = self.inputs(method)
    plan = _plan(method, q, k, v)
    layout = plan.layout
    self.assertEqual(layout.kv_idx.shape,
                     (_B, _H, _T, _CFG.key_capacity(_T)))
    self.assertEqual((layout.group_size, layout.num_keys), (1, _T))
    mask = np.asarray(layout.to_dense_mask(_T, _T))
    np.testing.assert_array_equal(mask, sea.element_mask(
        plan.aux["selected"], _T, True))
    self.assertFalse(np.any(mask & ~np.tril(np.ones((_T, _T), bool))))
    _listed_keys(layout, _T)  # distinct within each list

  def test_stretch_rule_matches_loop(self):
    tm, t = 8, 20
    cells = np.asarray(sea.stretch(
        jnp.arange(tm, dtype=jnp.float32)[None, None, None, :].repeat(t, 2),
        t, True))[0, 0]
    for row in range(t):
      length = row + 1
      for j in range(length):
        want = min(max(int(np.floor((j + 0.5) * tm / length - 1e-4)), 0),
                   tm - 1)
        self.assertEqual(cells[row, j], want)

  @parameterized.parameters(1, 7, 16, 64, 256)
  def test_cell_runs_match_owner_cell(self, tm):
    lengths = np.concatenate([np.arange(1, 400), [1023, 4097, 8192, 16384]])
    start, length = map(np.asarray, jax.jit(
        sea.cell_runs, static_argnums=1)(jnp.asarray(lengths), tm))
    keys = np.arange(lengths.max())
    owner = np.asarray(jax.jit(sea.owner_cell, static_argnums=2)(
        keys[None], lengths[:, None], tm))
    for i, n in enumerate(lengths):
      want = np.bincount(owner[i, :n], minlength=tm)
      np.testing.assert_array_equal(length[i], want, err_msg=f"L={n}")
      np.testing.assert_array_equal(start[i], np.cumsum(want) - want)
    # key_capacity's bound on the longest run.
    self.assertTrue(np.all(length.max(-1) <= -(-lengths // tm) + 1))

  def test_grouped_budget(self):
    est = jax.random.uniform(jax.random.key(0), (1, 3, 40, 16))
    keep = np.asarray(sea.grouped_topk(est, 4, causal=True))
    per_row = keep.sum((1, 3))[0]  # cells kept per query over heads
    want = np.clip(np.round(3 * 4 * 16 / (np.arange(40) + 1.0)), 1, 48)
    np.testing.assert_array_equal(per_row, want)
    keep = np.asarray(sea.grouped_topk(est, 4, causal=False))
    self.assertEqual(keep.sum(), 3 * 4 * 16)
    # Kept keys per row and head: k on average once rows are long.
    mask = np.asarray(sea.element_mask(
        sea.grouped_topk(est, 4, causal=True), 40, True))
    self.assertAlmostEqual(mask[:, :, 16:].sum(-1).mean(), 4, delta=1.5)

  @parameterized.named_parameters(
      ("causal", True, 40, 8, 3, None),
      ("causal_capped", True, 64, 16, 4, 12),
      ("non_causal_capped", False, 32, 8, 3, 8))
  def test_listed_keys_match_brute_force(self, causal, t, tm, topk, cap):
    est = jax.random.uniform(jax.random.key(t), (2, 3, t, tm))
    est = jnp.round(est * 6) / 6  # many ties
    cfg = sea.SEAConfig(causal=causal, predictor_len=tm, topk=topk,
                        max_keys=cap)
    capacity = cfg.key_capacity(t)
    visible = sea.row_lengths(t, t, causal)
    kept = jax.jit(sea.select_cells, static_argnums=(1, 2, 4))(
        est, topk, causal, visible, capacity)
    token_major = jax.jit(functools.partial(sea.select_cells, head_axis=2),
                          static_argnums=(1, 2, 4))(
                              jnp.moveaxis(est, 1, 2), topk, causal,
                              visible, capacity)
    np.testing.assert_array_equal(jnp.moveaxis(token_major, 2, 1), kept)
    with self.assertRaisesRegex(ValueError, "head_axis must be 1"):
      sea.select_cells(est, topk, causal, visible, capacity, head_axis=3)
    idx, cnt = jax.jit(sea.key_lists, static_argnums=(2, 3))(
        kept, visible, capacity, t)
    got = _listed_keys(row_layout.RowLayout.from_indices(idx, cnt,
                                                         num_keys=t), t)
    want = _brute_keys(np.asarray(est), topk, causal, capacity)
    for pos in np.ndindex(*want.shape):
      self.assertEqual(got[pos], want[pos], msg=f"(b, h, t)={pos}")
    if cap is not None:  # the cap binds somewhere
      grouped = np.asarray(sea.grouped_topk(est, topk, causal))
      self.assertTrue(np.any(grouped & ~np.asarray(kept)
                             & (np.asarray(sea.cell_runs(
                                 visible, tm)[1]) > 0)))

  def test_non_causal_gqa_and_bf16_match_reference(self):
    t = 32
    q, k, v = mtb.random_qkv(5, 2, t, t, 4, 2, _D)
    cfg = sea.SEAConfig(causal=False, predictor_len=16, topk=4,
                        output="sparse", width_divisor=2,
                        channels_per_head=4)
    method = sea.SEAMethod(cfg, 4, _D, rngs=nnx.Rngs(2))
    plan = _plan(method, q, k, v)
    mask = sea.element_mask(plan.aux["selected"], t, False)
    self.assertTrue(np.any(~np.asarray(mask)))
    run = jax.jit(lambda q, k, v: plan.attend(q, k, v, implementation="xla"))
    mtb.assert_values_and_grads_close(
        run, lambda q, k, v: mtb.masked_attention(q, k, v, mask), q, k, v)
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = run(*lo)
    self.assertEqual(out.dtype, jnp.bfloat16)
    want = mtb.masked_attention(*[x.astype(jnp.float32) for x in lo], mask)
    np.testing.assert_allclose(out.astype(jnp.float32), want,
                               atol=tolerances.atol(jnp.bfloat16))

  def test_plan_has_no_t_by_s_intermediate(self):
    t = 4096
    method = sea.SEAMethod(sea.SEAConfig(max_positions=t), 4, 64,
                           rngs=nnx.Rngs(0))
    graph, state = nnx.split(method)
    q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    size, shape, prim = jaxpr_size.largest_intermediate(
        lambda s, q, k, v: nnx.merge(graph, s).plan(q, k, v).layout,
        state, q, q, q)
    self.assertLess(size, t * t, f"{prim} builds {shape}")

  def test_mix_aux_and_losses(self):
    method = sea.SEAMethod(
        sea.SEAConfig(predictor_len=16, topk=8, max_positions=_T), _H, _D,
        rngs=nnx.Rngs(1))
    q, k, v, _ = self.inputs(method)

    @nnx.jit
    def run(m, q, k, v):
      plan = m.plan(q, k, v)
      return m(q, k, v), plan.attend(q, k, v), plan.aux

    out, sparse, aux = run(method, q, k, v)
    g = jax.nn.sigmoid(jnp.moveaxis(aux["gates"], 1, 2))
    avg = jnp.cumsum(v, 1) / jnp.arange(1, _T + 1)[None, :, None, None]
    want = g[..., 1:] * g[..., :1] * sparse + (1 - g[..., 1:]) * avg
    np.testing.assert_allclose(out, want, atol=tolerances.atol(jnp.float32))
    chex_shape = (_B, _H, _T, 16)
    self.assertEqual(aux["estimate"].shape, chex_shape)
    np.testing.assert_allclose(aux["estimate"].sum(-1), 1.0, atol=1e-5)
    teacher = jax.nn.softmax(jnp.where(
        np.tril(np.ones((_T, _T), bool)),
        jax.random.normal(jax.random.key(2), (_B, _H, _T, _T)), -jnp.inf), -1)
    grads = nnx.grad(lambda m: sea.estimator_loss(
        m.estimate(q, k, v)[0], teacher, True))(method)
    self.assertGreater(float(jnp.abs(grads.row_decoder.kernel[...]).sum()),
                       0)
    self.assertTrue(np.isfinite(float(sea.attention_loss(q, k, teacher,
                                                         True))))
    self.assertEqual(float(sea.context_loss(out, out)), 0.0)

  def test_chunked_linear_attention_matches_prefix_sums(self):
    keys = jax.random.split(jax.random.key(3), 3)
    fq, fk = (jax.random.uniform(x, (1, 2, 150, 5)) for x in keys[:2])
    v = jax.random.normal(keys[2], (1, 2, 150, 4))
    linear = jax.jit(sea._causal_linear)  # pylint: disable=protected-access
    num, den = linear(fq, fk, v)
    state = jnp.cumsum(fk[..., :, None] * v[..., None, :], axis=-3)
    np.testing.assert_allclose(
        num, jnp.einsum("bhtf,bhtfe->bhte", fq, state), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        den, jnp.sum(fq * jnp.cumsum(fk, axis=-2), -1), rtol=1e-5, atol=1e-5)

  def test_bad_max_keys(self):
    with self.assertRaisesRegex(ValueError, "max_keys"):
      sea.SEAMethod(sea.SEAConfig(max_keys=0), _H, _D, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "max_keys must be >= 33"):
      sea.SEAConfig(max_keys=16).key_capacity(8192)


if __name__ == "__main__":
  absltest.main()
