"""Sparse Sinkhorn attention (Tay et al. 2020) against its definition in
attention_variants/sinkhorn.py's docstring, written out here in float64
numpy with Python loops over blocks (sorting network, Sinkhorn balancing,
sorted blocks, one softmax over own and sorted keys): outputs and dense
weights, causal and bidirectional, padding, GQA, q_len != kv_len; the
blocked `xla` path against the dense `reference` (outputs and gradients);
the one-block limit that is full attention; doubly-stochastic balancing;
no future leak when causal; gradients reaching the sorting network, also
through the model; bad parameters; linear backward memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_variants as av
import variant_kit as kit
from attention_variants import sinkhorn
from configs import default
from tasks.base import Task
from train import step

ATOL = 1e-5
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _spec(implementation=None, **params):
  return kit.spec('sinkhorn', implementation, **params)


def _random_learned(params, kv_heads, d, max_len, seed=0, scale=1.5):
  """Sorting networks with random weights and biases (not init's zeros),
  large enough that R is far from uniform."""
  rng = np.random.default_rng(seed)
  m = sinkhorn.num_outputs(params, max_len)
  shapes = {'sort_w1': (kv_heads, d, d), 'sort_b1': (kv_heads, d),
            'sort_w2': (kv_heads, d, m), 'sort_b2': (kv_heads, m)}
  return {name: jnp.asarray(rng.normal(size=shape) * scale / np.sqrt(d),
                            jnp.float32) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------
# The definition in float64, one block at a time.

def _lse(x):
  top = np.max(x)
  return top + np.log(np.sum(np.exp(x - top)))


def _np_balance(logits, allowed, iterations, causal):
  """R [rows, cols] by the docstring's step 4, entry by entry."""
  x = np.where(allowed, logits, 0.0)
  rows, cols = x.shape
  for _ in range(iterations):
    y = x.copy()
    for i in range(rows):
      if allowed[i].any():
        y[i, allowed[i]] = x[i, allowed[i]] - _lse(x[i, allowed[i]])
    x = y.copy()
    for i in range(rows):
      for j in range(cols):
        if allowed[i, j]:
          above = [r for r in range(rows) if allowed[r, j]
                   and (not causal or r <= i)]
          x[i, j] = y[i, j] - _lse(y[above, j])
  return np.where(allowed, np.exp(x), 0.0)


def _np_sorting(q, ql, kl, learned, params, causal, kv_head, groups, n_k):
  """R of one batch row and kv head (q: that row's [n_q, h, d])."""
  n_q, _, d = q.shape
  b = min(params['block_size'], max(n_q, n_k))
  n_qb, n_kb = -(-n_q // b), -(-n_k // b)
  heads = range(kv_head * groups, (kv_head + 1) * groups)
  summary = np.zeros((n_qb, d))
  for i in range(n_qb):
    span = range(i * b + 1) if causal else range(i * b, (i + 1) * b)
    rows = [p for p in span if p < min(ql, n_q)]
    if rows:
      summary[i] = np.mean([q[p, hh] for p in rows for hh in heads], axis=0)
  w = {name: np.asarray(x, np.float64)[kv_head]
       for name, x in learned.items()}
  hidden = np.maximum(summary @ w['sort_w1'] + w['sort_b1'], 0.0)
  logits = hidden @ w['sort_w2'][:, :n_kb] + w['sort_b2'][:n_kb]
  allowed = np.zeros((n_qb, n_kb), bool)
  for i in range(n_qb):
    for j in range(n_kb):
      allowed[i, j] = (i * b < ql and j * b < kl
                       and (not causal or j < i))
  return _np_balance(logits / params['temperature'], allowed,
                     params['sinkhorn_iterations'], causal), b


def _np_sinkhorn(q, k, v, ql, kl, learned, params, causal):
  """(output [b, n_q, h, d], weights [b, h, n_q, n_k]) in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  bsz, n_q, h, d = q.shape
  n_k, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  out = np.zeros((bsz, n_q, h, d))
  dense = np.zeros((bsz, h, n_q, n_k))
  for row in range(bsz):
    lq, lk = int(ql[row]), int(kl[row])
    for kvh in range(kv_heads):
      r, b = _np_sorting(q[row], lq, lk, learned, params, causal, kvh,
                         groups, n_k)
      for i in range(r.shape[0]):
        # Sorted block i: slot t mixes the valid keys at slot t.
        slots = []
        for t in range(b):
          mix = {j * b + t: r[i, j] for j in range(r.shape[1])
                 if j * b + t < lk}
          total = sum(mix.values())
          if total > 0:
            mix = {p: wt / total for p, wt in mix.items()}
            slots.append((sum(wt * k[row, p, kvh] for p, wt in mix.items()),
                          sum(wt * v[row, p, kvh] for p, wt in mix.items()),
                          mix))
        for hh in range(kvh * groups, (kvh + 1) * groups):
          for p in range(i * b, min((i + 1) * b, n_q)):
            if p >= lq:
              continue
            keys = [(k[row, j, kvh], v[row, j, kvh], {j: 1.0})
                    for j in range(i * b, min((i + 1) * b, n_k))
                    if j < lk and (not causal or j <= p)] + slots
            if not keys:
              continue
            s = np.array([q[row, p, hh] @ kk for kk, _, _ in keys])
            pr = np.exp(s / np.sqrt(d) - np.max(s / np.sqrt(d)))
            pr /= pr.sum()
            for weight, (_, vv, mix) in zip(pr, keys):
              out[row, p, hh] += weight * vv
              for j, wt in mix.items():
                dense[row, hh, p, j] += weight * wt
  return out, dense


# (block_size, n_q, n_k, kv_heads)
CASES = {
    'b4': (4, 21, 21, 2),          # 6 blocks, the last one partial
    'b5_cross': (5, 13, 22, 1),    # more key blocks than query blocks
    'b4_cross': (4, 22, 13, 2),    # more query blocks than key blocks
}


def _run(q, k, v, attends, weights=()):
  """One compiled program: [(out, (dq, dk, dv))] of each attention function
  for kit's fixed random cotangent, and the arrays of `weights`."""
  ct = kit.cotangent(q.shape)

  def run(q, k, v):
    results = []
    for fn in attends:
      out, pullback = jax.vjp(fn, q, k, v)
      results.append((out, pullback(ct)))
    return results, [fn(q, k, v) for fn in weights]
  return _jit(run)(q, k, v)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_the_definition_in_float64(case, causal):
  """xla, reference and the dense weights against the float64 loops."""
  block_size, n_q, n_k, kv_heads = CASES[case]
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads, scale=1.0)
  params = {**av.defaults('sinkhorn'), 'block_size': block_size}
  learned = _random_learned(params, kv_heads, 8, max(n_q, n_k))
  want_out, want_w = _np_sinkhorn(q, k, v, ql, kl, learned, params, causal)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl, learned=learned)
  spec = _spec(block_size=block_size)
  reference = _spec('reference', block_size=block_size)
  run = _jit(lambda q, k, v: (av.attend(q, k, v, spec, **kw),
                              av.attend(q, k, v, reference, **kw),
                              av.attention_weights(q, k, v, spec, **kw)))
  out, ref, w = (np.asarray(x) for x in run(q, k, v))
  np.testing.assert_allclose(w, want_w, atol=ATOL)
  np.testing.assert_allclose(out, want_out, atol=ATOL)
  np.testing.assert_allclose(ref, want_out, atol=ATOL)
  # Rows sum to 1, or are zeros (padded query, no visible key).
  sums = w.sum(-1)
  assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
  assert (w[1] == 0).all() and (out[1] == 0).all()  # no valid key at all
  padded = np.arange(n_q)[None, :] >= np.asarray(ql)[:, None]
  assert (out[padded] == 0).all()
  # Padded keys get no weight.
  key_padded = np.arange(n_k) >= np.asarray(kl)[:, None, None, None]
  assert (w * key_padded == 0).all()


@pytest.mark.parametrize('shape', [(21, 21, 64), (13, 22, 30)],
                         ids=['clamped', 'cross'])
def test_one_block_is_full_attention(shape):
  """block_size >= the sequence: R = [1], the sorted block is the block
  itself, and the two copies of each key count once (outputs, gradients
  and dense weights equal full attention's, causal and bidirectional)."""
  n_q, n_k, block_size = shape
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, 2, scale=1.0)
  spec = _spec(block_size=block_size)
  learned = _random_learned(av.resolve(spec)[1], 2, 8, max(n_q, n_k))
  attends, weights = [], []
  for causal in (False, True):
    kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
    attends += [
        lambda q, k, v, kw=kw: av.attend(q, k, v, spec, learned=learned,
                                         **kw),
        lambda q, k, v, kw=kw: kit.reference(q, k, v, **kw)]
    weights += [
        lambda q, k, v, kw=kw: av.attention_weights(q, k, v, spec,
                                                    learned=learned, **kw),
        lambda q, k, v, kw=kw: av.attention_weights(q, k, v, kit.REFERENCE,
                                                    **kw)]
  outs, ws = _run(q, k, v, attends, weights)
  for i in (0, 2):
    kit.assert_close(outs[i], outs[i + 1], atol=ATOL)
    np.testing.assert_allclose(ws[i], ws[i + 1], atol=1e-6)


def test_balancing_is_doubly_stochastic():
  """Square bidirectional R: rows and columns sum to 1 after enough
  rounds (also on the valid part of a padded matrix); one round ends with
  the columns. Causal R: zero on and above the diagonal, row i unchanged
  by later rows' logits."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6, 6)) * 1.5,
                       jnp.float32)
  every = jnp.ones((6, 6), bool)
  run = _jit(lambda x, ok, n, causal: sinkhorn.balance(x, ok, n,
                                                       causal=causal),
             static_argnums=(2, 3))
  r = np.asarray(run(logits, every, 100, False))
  np.testing.assert_allclose(r.sum(-1), 1, atol=1e-4)
  np.testing.assert_allclose(r.sum(-2), 1, atol=1e-5)
  one = np.asarray(run(logits, every, 1, False))
  np.testing.assert_allclose(one.sum(-2), 1, atol=1e-6)
  assert np.abs(one.sum(-1) - 1).max() > 1e-2
  valid = np.arange(6) < 4
  part = np.asarray(run(logits, valid[:, None] & valid[None, :], 100, False))
  assert (part[..., 4:, :] == 0).all() and (part[..., :, 4:] == 0).all()
  np.testing.assert_allclose(part[..., :4, :4].sum(-1), 1, atol=1e-4)
  np.testing.assert_allclose(part[..., :4, :4].sum(-2), 1, atol=1e-5)
  lower = np.tril(np.ones((6, 6), bool), -1)
  causal = np.asarray(run(logits, lower, 7, True))
  assert (causal[..., ~lower] == 0).all() and (causal[..., lower] > 0).all()
  changed = logits.at[..., 3:, :].add(5.0)
  np.testing.assert_array_equal(np.asarray(run(changed, lower, 7, True))
                                [..., :3, :], causal[..., :3, :])
  as64 = lambda x: np.asarray(x, np.float64)
  np.testing.assert_allclose(
      r[0, 0], _np_balance(as64(logits[0, 0]), np.asarray(every), 100, False),
      atol=1e-5)
  np.testing.assert_allclose(
      causal[1, 2], _np_balance(as64(logits[1, 2]), lower, 7, True),
      atol=1e-5)


def test_sorting_matrix_of_the_model_is_doubly_stochastic():
  q, k, _, ql, kl = kit.padded_inputs(24, 24, 2, scale=1.0)
  params = {**av.defaults('sinkhorn'), 'block_size': 4,
            'sinkhorn_iterations': 60}
  learned = _random_learned(params, 2, 8, 24)
  r = np.asarray(_jit(lambda q, k: sinkhorn.sorting_matrix(
      q, k, learned, params, causal=False, q_lengths=ql, kv_lengths=kl))(q, k))
  assert r.shape == (4, 2, 6, 6)
  np.testing.assert_allclose(r[0].sum(-1), 1, atol=1e-4)  # all valid
  np.testing.assert_allclose(r[0].sum(-2), 1, atol=1e-4)
  assert (r[1] == 0).all()  # no valid key: no sortable block
  assert (r[2, :, 2:] == 0).all() and (r[2, :, :, 3:] == 0).all()


@pytest.mark.parametrize('implementation', ['xla', 'reference'])
def test_causal_has_no_future_leak(implementation):
  """Changing q, k, v from position 10 on (inside block 2 of 4-blocks)
  leaves every earlier output unchanged; bidirectional ones change."""
  q, k, v = kit.inputs(24, 24, batch=2, heads=4, kv_heads=2, head_dim=8)
  q2, k2, v2 = kit.inputs(24, 24, batch=2, heads=4, kv_heads=2, head_dim=8,
                          seed=5)
  cut = 10
  later = lambda x, y: x.at[:, cut:].set(y[:, cut:])
  spec = _spec(implementation, block_size=4)
  learned = _random_learned(av.resolve(spec)[1], 2, 8, 24)
  run = _jit(lambda q, k, v: [av.attend(q, k, v, spec, causal=causal,
                                        learned=learned)
                              for causal in (True, False)])
  before = run(q, k, v)
  after = run(later(q, q2), later(k, k2), later(v, v2))
  np.testing.assert_allclose(after[0][:, :cut], before[0][:, :cut], atol=1e-6)
  assert not np.allclose(after[1][:, :cut], before[1][:, :cut], atol=1e-3)


def test_gradients_reach_the_sorting_network():
  """Every sorting-network array gets a gradient; the gradients of the
  blocked xla path (learned, q, k, v) equal the dense reference's, causal
  and bidirectional, with padding, GQA and 6 blocks."""
  q, k, v, ql, kl = kit.padded_inputs(21, 21, 2, scale=1.0)
  params = {**av.defaults('sinkhorn'), 'block_size': 4}
  learned = _random_learned(params, 2, 8, 21)
  ct = kit.cotangent(q.shape)

  def loss(learned, q, k, v, implementation, causal):
    out = av.attend(q, k, v, _spec(implementation, block_size=4),
                    causal=causal, q_lengths=ql, kv_lengths=kl,
                    learned=learned)
    return jnp.sum(out * ct)
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  grads = _jit(lambda *args: [[grad(*args, impl, causal)
                               for impl in ('xla', 'reference')]
                              for causal in (False, True)])(learned, q, k, v)
  for causal, (got, ref) in zip(('bidir', 'causal'), grads):
    for name in sinkhorn.LEARNED:
      g = np.asarray(got[0][name])
      assert g.shape == learned[name].shape and np.isfinite(g).all()
      assert np.abs(g).max() > 1e-4, (causal, name)
      np.testing.assert_allclose(g, ref[0][name], atol=ATOL,
                                 err_msg=f'{causal} {name}')
    for name, g, want in zip('qkv', got[1:], ref[1:]):
      assert np.isfinite(np.asarray(g)).all()
      np.testing.assert_allclose(g, want, atol=ATOL,
                                 err_msg=f'{causal} d{name}')


def test_init_shapes_and_low_precision():
  """init: one sorting network per kv head scoring ceil(max_len /
  block_size) blocks; bfloat16 in, bfloat16 out, float32 statistics."""
  spec = _spec(block_size=4)
  learned = av.init_learned(spec, jax.random.key(0), num_heads=4,
                            num_kv_heads=2, head_dim=8, max_len=21)
  assert sorted(learned) == sorted(sinkhorn.LEARNED)
  assert learned['sort_w1'].shape == (2, 8, 8)
  assert learned['sort_w2'].shape == (2, 8, 6)
  assert learned['sort_b2'].shape == (2, 6)
  assert all(x.dtype == jnp.float32 for x in learned.values())
  q, k, v, ql, kl = kit.padded_inputs(21, 21, 2, dtype=jnp.bfloat16)
  out = _jit(lambda q, k, v: av.attend(
      q, k, v, spec, causal=True, q_lengths=ql, kv_lengths=kl,
      learned=learned))(q, k, v)
  assert out.dtype == jnp.bfloat16
  want, _ = _np_sinkhorn(*(np.asarray(x, np.float32) for x in (q, k, v)), ql,
                         kl, learned, av.resolve(spec)[1], True)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


@pytest.mark.parametrize('name,value', [
    ('block_size', 0), ('block_size', 2.0),
    ('sinkhorn_iterations', 0), ('sinkhorn_iterations', True),
    ('temperature', 0), ('temperature', -0.5), ('temperature', True),
    ('temperature', float('inf')), ('temperature', '1'),
])
def test_bad_params_raise(name, value):
  kit.assert_bad_params_raise(
      _spec(**{name: value}), rf'attention\.sinkhorn\.{name}=.* is invalid')


def test_learned_parameters_are_required_and_checked():
  q, k, v, _, _ = kit.padded_inputs(9, 9)
  spec = _spec(block_size=4)
  assert av.owns_parameters(spec)
  with pytest.raises(ValueError, match='learned is missing sort_w1'):
    av.attend(q, k, v, spec)
  short = av.init_learned(spec, jax.random.key(0), num_heads=4,
                          num_kv_heads=2, head_dim=8, max_len=8)
  with pytest.raises(ValueError, match='3 key blocks.*scores 2'):
    av.attend(q, k, v, spec, learned=short)
  with pytest.raises(ValueError, match='missing sort_b2'):
    av.attend(q, k, v, spec, learned={n: short[n] for n in ('sort_w1',
                                                           'sort_b1',
                                                           'sort_w2')})
  one_head = av.init_learned(spec, jax.random.key(0), num_heads=4,
                             num_kv_heads=1, head_dim=8, max_len=9)
  with pytest.raises(ValueError, match='does not fit 2 kv heads'):
    av.attend(q, k, v, spec, learned=one_head)


@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_backward_memory_is_linear_in_length(causal):
  """Doubling N at most doubles forward + backward memory (N x N would
  4x): default blocks of 64, so the (N / b)^2 sorting matrix stays small."""
  kit.assert_backward_memory_is_linear(_spec(), causal=causal, n=1024)


def test_model_holds_the_sorting_network_as_parameters():
  """step.build: every layer's sorting network is an nnx.Param of the
  model, so the optimizer (wrt=nnx.Param) and the parameter count see it
  (that it trains: tests/test_every_kind_trains.py, -m slow)."""
  model_cfg = default.base().model
  model_cfg.update(num_layers=1, dim=16, num_heads=2, num_kv_heads=1,
                   mlp_dim=32)
  task = Task('toy', vocab_size=12, seq_len=16, num_classes=2,
              head='classify', causal=False, sources=None, cls_token=True)
  spec = {'kind': 'sinkhorn', 'sinkhorn': {'block_size': 4}}
  setup = step.build(model_cfg, spec, task, default.base().train, seed=0)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  block = model.encoder.blocks[0]
  for name in sinkhorn.LEARNED:
    assert isinstance(block.attn.learned[name], nnx.Param), name
  assert block.attn.learned['sort_w1'].shape == (1, 8, 8)
  assert block.attn.learned['sort_w2'].shape == (1, 8, 4)  # 16 / 4 blocks
  params = nnx.state(model, nnx.Param)
  learned = params['encoder']['blocks'][0]['attn']['learned']
  assert sorted(learned) == sorted(sinkhorn.LEARNED)
  assert setup.num_params == step.count_params(model)
