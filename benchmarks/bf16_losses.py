"""bfloat16 against float32 losses: time, and drift of the loss and its gradients, with the bound.

Inputs are what a bfloat16 tower hands the loss: random unit rows z1 [B, D] and partners z2 whose
cosine similarity c_i is uniform in [0.5, 0.95] (--confident: [0.9, 0.99], a late-training batch),
rounded to bfloat16. The float32 run gets the same values as float32, the float64 reference the
same values as float64, so every difference is the computation's. For each loss, path (dense,
blockwise or ring) and B, one JSON line:

  python benchmarks/bf16_losses.py > benchmarks/results/bf16_losses.jsonl
  for d in 128 512; do XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python benchmarks/bf16_losses.py --batch_sizes=256,1024,4096 --dim=$d --block_size=256 \
    --paths=dense,blockwise,ring --repeats=1; done > benchmarks/results/bf16_losses_sweep.jsonl

The path `ring` (blockwise under shard_map over 8 devices, key chunks passed around a ppermute
ring) needs the 8 virtual devices of the XLA_FLAGS above, set before jax starts.

Fields: loss, path, batch, dim, block_size, time_f32_s / time_bf16_s (medians over --repeats
rounds, each timing the float32 and the bfloat16 step in turn, after a first compiling call of
each), times_*_s, loss_f32, dloss_bf16 = |L_bf16 - L_f32|, dloss_f32 = |L_f32 - L_f64| (the
floor), dgrad_bf16 = ||g_bf16 - g_f32|| / ||g_f32|| over both inputs' gradients, dgrad_f32 =
||g_f32 - g_f64|| / ||g_f64||, and up to --bound_limit the bounds of the drift:
loss_bound, grad_bound (`loss_bound`, `grad_bound`).

The bound (u = 2^-8, bfloat16's unit roundoff: 8 significand bits). The bfloat16 path computes
the float32 loss F of the normalised rows q, rounded: q~ = q + e, |e_d| <= u |q_d|, everything
after that in float32 (2^-24). Rounding errors modelled as independent with mean 0 (Higham &
Mary 2019, "A new approach to probabilistic rounding error analysis"), each of variance
<= u^2 q_d^2 / 3:

  loss   L(q~) - L(q) = <grad F, e> + O(u^2): a sum of independent terms, so
         |dL| <= lam u / sqrt(3) ||q (.) grad F||_F  (lam = 5 standard deviations).
  grad   the gradient is evaluated at q~ (error Hess F e), its cotangent w.r.t. q~ and the input
         gradient are rounded to bfloat16 (u ||grad F||, u ||g||), and on the tiled paths the dS
         of each tile is rounded for the two backward matmuls (u sqrt(2) ||dS||_F, dS = dF/dS).
         Independent, so in quadrature:
         ||dg|| <= lam u / sqrt(3) sqrt(||Hess F diag(q)||_F^2 + ||grad F||^2 + ||g||^2
                                          [+ 2 ||dS||_F^2 tiled]),  lam = 3,
         ||Hess F diag(q)||_F^2 = E_v ||Hess F diag(q) v||^2 over random signs v (Hutchinson).
F, its gradient, dS and the Hessian-vector products are the float64 reference formulas below.
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

U = 2.0 ** -8  # bfloat16 unit roundoff: 8 significand bits
TEMPERATURE, BIAS = 0.07, -10.0
LAM_LOSS, LAM_GRAD = 5.0, 3.0
REALISTIC, CONFIDENT = (0.5, 0.95), (0.9, 0.99)  # ranges of the positive cosine similarity


def embeddings(b, d, similarity=REALISTIC, seed=0):
  """(z1, z2) [B, D] float32 holding bfloat16 values: unit rows, cos(z1_i, z2_i) ~ U[lo, hi]."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  n = rng.normal(size=(b, d))
  n -= np.sum(n * q, axis=1, keepdims=True) * q  # orthogonal to q: cos(q, k) = c exactly
  n /= np.linalg.norm(n, axis=1, keepdims=True)
  c = rng.uniform(*similarity, size=(b, 1))
  k = c * q + np.sqrt(1 - c * c) * n
  return tuple(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k))


def _info_nce(s):
  x = s / TEMPERATURE
  return jnp.mean(jax.nn.logsumexp(x, axis=1) - jnp.diagonal(x))


def _clip_loss(s):
  x = s / TEMPERATURE
  diag = jnp.diagonal(x)
  return 0.5 * (jnp.mean(jax.nn.logsumexp(x, axis=1) - diag) +
                jnp.mean(jax.nn.logsumexp(x, axis=0) - diag))


def _sigmoid_loss(s):
  labels = 2.0 * jnp.eye(s.shape[0]) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * (s / TEMPERATURE + BIAS))) / s.shape[0]


# F as a function of the similarities S = q k^T of normalised rows (the dense losses' formulas).
REFERENCES = {'info_nce': _info_nce, 'clip_loss': _clip_loss, 'sigmoid_loss': _sigmoid_loss}


def _normalised(z1, z2):
  return tuple(jnp.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), jnp.float64)
               for z in (z1, z2))


def _grad_f(loss):
  """grad F w.r.t. (q, k) of the float64 reference F(q, k) = REFERENCES[loss](q k^T)."""
  return jax.grad(lambda q, k: REFERENCES[loss](q @ k.T), argnums=(0, 1))  # (B, D).(D, B)


@functools.partial(jax.jit, static_argnums=0)
def _loss_norm(loss, q, k):
  gq, gk = _grad_f(loss)(q, k)
  return jnp.sqrt(jnp.sum((q * gq) ** 2) + jnp.sum((k * gk) ** 2))


def loss_bound(loss, z1, z2):
  """Bound of |L_bf16 - L_f32|: LAM_LOSS u / sqrt(3) ||q (.) grad F||_F (module docstring)."""
  with jax.enable_x64(True):
    return LAM_LOSS * U / np.sqrt(3) * float(_loss_norm(loss, *_normalised(z1, z2)))


@functools.partial(jax.jit, static_argnums=0)
def _grad_squares(loss, q, k, signs):
  """(squared norms of the untiled terms, ||dS||_F^2, ||g||^2)."""
  grad_f = _grad_f(loss)
  gq, gk = grad_f(q, k)
  # ||Hess F diag(q)||_F^2 = E_v ||Hess F diag(q) v||^2 over random signs v (Hutchinson).
  hq, hk = jax.vmap(lambda v: jax.jvp(grad_f, (q, k), (q * v[0], k * v[1]))[1])(signs)
  hessian = (jnp.sum(hq ** 2) + jnp.sum(hk ** 2)) / signs.shape[0]
  # The input gradient g = (I - q q^T) grad F / |z| on unit rows: its norm from grad F.
  g_norm2 = sum(jnp.sum((x - jnp.sum(x * y, axis=1, keepdims=True) * y) ** 2)
                for x, y in ((gq, q), (gk, k)))
  ds_norm2 = jnp.sum(jax.grad(REFERENCES[loss])(q @ k.T) ** 2)  # dS = dF/dS, (B, B)
  return hessian + jnp.sum(gq ** 2) + jnp.sum(gk ** 2) + g_norm2, ds_norm2, g_norm2


def grad_bounds(loss, z1, z2, *, probes=4, seed=1):
  """Bounds of ||g_bf16 - g_f32|| / ||g_f32|| over both inputs' gradients, (dense, tiled)."""
  with jax.enable_x64(True):
    q, k = _normalised(z1, z2)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(probes, 2) + q.shape)
    terms, ds_norm2, g_norm2 = map(float, _grad_squares(loss, q, k, signs))
  scale = LAM_GRAD * U / np.sqrt(3)
  return scale * np.sqrt(terms / g_norm2), scale * np.sqrt((terms + 2 * ds_norm2) / g_norm2)


def loss_fn(loss, **kw):
  """fn(z1, z2) -> loss scalar of contrastive.losses' `loss` with the benchmark's tau, b."""
  from contrastive import losses  # pylint: disable=g-import-not-at-top
  if loss == 'sigmoid_loss':
    return lambda a, b: losses.sigmoid_loss(a, b, temperature=TEMPERATURE, bias=BIAS, **kw)[0]
  return lambda a, b: getattr(losses, loss)(a, b, temperature=TEMPERATURE, **kw)[0]


def _as_float64(loss, grads):
  return float(loss), np.concatenate([np.asarray(g, np.float64) for g in grads])


def value_and_grads(fn, z1, z2, dtype):
  """(loss as float, gradients w.r.t. (z1, z2) stacked [2B, D] float64) of fn on dtype inputs."""
  step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  return _as_float64(*step(jnp.asarray(z1, dtype), jnp.asarray(z2, dtype)))


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch_sizes', default='4096,8192,16384')
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--losses', default='info_nce,clip_loss')
  p.add_argument('--paths', default='dense,blockwise', help='dense, blockwise, ring (8 devices)')
  p.add_argument('--block_size', type=int, default=1024)
  p.add_argument('--dense_limit', type=int, default=8192, help='largest B for the dense path')
  p.add_argument('--bound_limit', type=int, default=4096, help='largest B to compute the bounds at')
  p.add_argument('--repeats', type=int, default=3, help='interleaved timed rounds')
  p.add_argument('--confident', action='store_true', help='positives in [0.9, 0.99]')
  return p.parse_args(argv)


def _timed(steps, repeats):
  """({name: [seconds]}, {name: last output}): a compiling call of each, then `repeats` rounds
  calling each in turn."""
  times, outputs = {name: [] for name in steps}, {}
  for name, step in steps.items():
    outputs[name] = jax.block_until_ready(step())
  for _ in range(repeats):  # rounds: each step once, so drift of a shared machine hits both
    for name, step in steps.items():
      outputs.pop(name)  # not alive during the next call
      start = time.perf_counter()
      outputs[name] = jax.block_until_ready(step())
      times[name].append(time.perf_counter() - start)
  return times, outputs


def run_point(loss, path, b, args):
  z1, z2 = embeddings(b, args.dim, CONFIDENT if args.confident else REALISTIC)
  kw = dict(block_size=args.block_size) if path != 'dense' else {}
  if path == 'ring':
    kw['mesh'] = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  fn = loss_fn(loss, **kw)
  record = dict(loss=loss, path=path, batch=b, dim=args.dim, block_size=kw.get('block_size'),
                similarity=CONFIDENT if args.confident else REALISTIC)
  steps = {}
  for name, dtype in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    inputs = (jnp.asarray(z1, dtype), jnp.asarray(z2, dtype))
    steps[name] = lambda step=step, inputs=inputs: step(*inputs)
  times, outputs = _timed(steps, args.repeats)
  for name in steps:
    record[f'time_{name}_s'] = statistics.median(times[name])
    record[f'times_{name}_s'] = times[name]
  (l32, g32), (l16, g16) = (_as_float64(*outputs[name]) for name in ('f32', 'bf16'))
  del outputs
  with jax.enable_x64(True):  # the reference: blockwise beyond the dense limit (memory O(B D))
    ref = loss_fn(loss, block_size=args.block_size) if b > args.dense_limit else fn
    l64, g64 = value_and_grads(ref, z1, z2, jnp.float64)
  record.update(loss_f32=l32, dloss_bf16=abs(l16 - l32), dloss_f32=abs(l32 - l64),
                dgrad_bf16=rel(g16, g32), dgrad_f32=rel(g32, g64))
  if b <= args.bound_limit:
    record['loss_bound'] = loss_bound(loss, z1, z2)
    record['grad_bound'] = grad_bounds(loss, z1, z2)[path != 'dense']
  return record


def main(argv=None):
  args = parse_args(argv)
  for b in map(int, args.batch_sizes.split(',')):
    for loss in args.losses.split(','):
      for path in args.paths.split(','):
        if path == 'dense' and b > args.dense_limit:
          continue
        print(json.dumps(run_point(loss, path, b, args)), flush=True)


if __name__ == '__main__':
  main()
