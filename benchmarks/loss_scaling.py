"""Time and peak memory of a loss's forward + backward against the batch size B.

Implementations: `dense` (the jnp loss, a [B, B] logit matrix), `blockwise` (block_size=...,
one device or `mesh=` over the virtual CPU devices, ring or all-gather), `torch` (an
open_clip-style loss, if torch is importable) and, with --loss=info_nce, `pamc` (PamC's
meta-node approximation, `losses.pamc_info_nce`, one point per --num_clusters K). Each point
runs in a fresh subprocess with its own XLA_FLAGS device count, so its peak RSS (getrusage
ru_maxrss, read before anything else runs) is its own, and prints one JSON line:

  python benchmarks/loss_scaling.py --batch_sizes=8192,16384,32768 --devices=1,8 \\
      >> benchmarks/results/loss_scaling.jsonl
  python benchmarks/plot_loss_scaling.py benchmarks/results/loss_scaling.jsonl
  python benchmarks/loss_scaling.py --loss=info_nce --impls=blockwise,pamc --devices=1 \\
      --batch_sizes=8192,32768 --num_clusters=64,256,1024 >> benchmarks/results/pamc.jsonl

Fields: loss, impl, batch, dim, devices, block_size, collective, time_s (median over
--repeats timed calls after a first, compiling, call), times_s, first_call_s, floor_s (median
time of 3 B x B x D matmuls in column chunks in the same process: the FLOPs any exact forward
+ backward must do), ratio = time_s / floor_s, peak_rss_gib, max_abs_dloss / max_abs_dgrad
(against the dense 1-device point of the same B, saved under --ref_dir; null if none ran;
for `pamc` against the exact blockwise 1-device point when it ran, else the dense one: `ref`
names it), rel_dloss = |dloss| / |loss_ref|, rel_dgrad = |dg| / |g_ref| and grad_cosine
(Frobenius norm and cosine over both inputs' gradients), num_clusters (pamc's K), temperature
(0.07 unless --temperature), centres
(0: z1 ~ N(0, I), z2 = z1 + N(0, I); C: z1 = one of C random centres + N(0, 0.5^2 I),
z2 = z1 + N(0, 0.3^2 I)),
xla_gib (XLA's compiled argument / output / temp sizes; the rest of the RSS is the runtime's
~0.26 GiB and the inputs).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

TEMPERATURE, BIAS = 0.07, -10.0


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch_sizes', default='8192,16384,32768,65536')
  p.add_argument('--devices', default='1,8', help='virtual CPU device counts')
  p.add_argument('--impls', default='dense,blockwise,torch', help='also: pamc (info_nce only)')
  p.add_argument('--loss', default='clip_loss', choices=['clip_loss', 'info_nce', 'sigmoid_loss'])
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--block_size', type=int, default=1024)
  p.add_argument('--num_clusters', default='64,256,1024', help='pamc: meta-nodes K, one point each')
  p.add_argument('--temperature', type=float, default=TEMPERATURE)
  p.add_argument('--centres', type=int, default=0,
                 help='0: z1 ~ N(0, I); C > 0: z1 = one of C random centres + N(0, 0.5^2 I)')
  p.add_argument('--collectives', default='ring,all_gather', help='for blockwise on >1 device')
  p.add_argument('--dense_limit', type=int, default=16384, help='largest B for dense and torch')
  p.add_argument('--floor_limit', type=int, default=65536, help='largest B to time the floor at')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed calls after the first; 0: time_s is the first (compiling) call')
  p.add_argument('--ref_dir', default='/tmp/loss_scaling_refs')
  p.add_argument('--point', default=None, help=argparse.SUPPRESS)  # internal: run one point
  return p.parse_args(argv)


def _points(args):
  for b in map(int, args.batch_sizes.split(',')):
    for n in map(int, args.devices.split(',')):
      for impl in args.impls.split(','):
        if impl in ('dense', 'torch') and b > args.dense_limit:
          continue
        if impl == 'torch' and n > 1 or impl == 'pamc' and args.loss != 'info_nce':
          continue
        collectives = args.collectives.split(',') if impl == 'blockwise' and n > 1 else [None]
        clusters = map(int, args.num_clusters.split(',')) if impl == 'pamc' else [None]
        for collective, k in ((c, k) for k in clusters for c in collectives):
          yield dict(loss=args.loss, impl=impl, batch=b, dim=args.dim, devices=n,
                     block_size=args.block_size if impl == 'blockwise' else None,
                     collective=collective, num_clusters=k, centres=args.centres,
                     temperature=args.temperature, repeats=args.repeats,
                     ref_dir=args.ref_dir, floor=b <= args.floor_limit)


def main(argv=None):
  args = parse_args(argv)
  if args.point is not None:
    print(json.dumps(run_point(json.loads(args.point))), flush=True)
    return
  os.makedirs(args.ref_dir, exist_ok=True)
  for point in _points(args):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={point["devices"]}')
    proc = subprocess.run([sys.executable, __file__, '--point', json.dumps(point)], env=env,
                          capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
      record = dict(point, error=f'exit {proc.returncode}: {proc.stderr.strip()[-500:]}')
      print(json.dumps(record), flush=True)
    else:
      print(lines[-1], flush=True)


# ---- One point, in its own process -----------------------------------------------------------


def _peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def _timed(step, repeats):
  """(first call seconds, [seconds of each later call]); step() blocks until done."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):  # host-side timing loop
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, times


def _jax_step(point, z1, z2):
  import jax  # pylint: disable=g-import-not-at-top
  from contrastive import losses  # pylint: disable=g-import-not-at-top
  from contrastive import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh([('data', -1)]) if point['devices'] > 1 else None
  kw = {}
  if point['impl'] == 'blockwise':
    kw = dict(block_size=point['block_size'], mesh=mesh)
    if point['collective']:
      kw['collective'] = point['collective']
  tau = point['temperature']
  fns = {'clip_loss': lambda a, b: losses.clip_loss(a, b, temperature=tau, **kw),
         'info_nce': lambda a, b: losses.info_nce(a, b, temperature=tau, **kw),
         'sigmoid_loss': lambda a, b: losses.sigmoid_loss(a, b, temperature=tau, bias=BIAS, **kw)}
  fn = fns[point['loss']]
  if point['impl'] == 'pamc':  # InfoNCE with PamC's meta-node negatives
    fn = lambda a, b: losses.pamc_info_nce(a, b, temperature=tau,
                                           num_clusters=point['num_clusters'], mesh=mesh)
  step = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b)[0], argnums=(0, 1)))
  if mesh is not None:
    z1, z2 = (jax.device_put(z, parallel.data_sharding(mesh)) for z in (z1, z2))
  out = {}

  def run():
    out.clear()  # the previous call's outputs are not kept alive during this one
    out['value'] = jax.block_until_ready(step(z1, z2))

  def result():
    memory = step.lower(z1, z2).compile().memory_analysis()
    out['xla_gib'] = {k: getattr(memory, f'{k}_size_in_bytes') / 2**30
                      for k in ('argument', 'output', 'temp')}
    return jax.device_get(out['value']) + (out['xla_gib'],)

  return run, result


def _torch_step(point, z1, z2):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  a, b = (torch.from_numpy(np.array(z)).requires_grad_() for z in (z1, z2))
  labels = torch.arange(z1.shape[0])
  out = {}

  def run():  # open_clip ClipLoss / SigLipLoss on one device
    a.grad = b.grad = None
    out.clear()
    fa, fb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = fa @ fb.T / point['temperature']
    if point['loss'] == 'sigmoid_loss':
      signs = 2 * torch.eye(len(labels)) - 1
      loss = -F.logsigmoid(signs * (logits + BIAS)).sum() / len(labels)
    elif point['loss'] == 'clip_loss':
      logits_t = fb @ fa.T / point['temperature']  # open_clip computes both directions'
      loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits_t, labels)) / 2
    else:
      loss = F.cross_entropy(logits, labels)
    loss.backward()
    out['value'] = (loss.detach(), (a.grad, b.grad))

  def result():
    loss, grads = out['value']
    return loss.numpy(), tuple(g.numpy() for g in grads), None

  return run, result


def _matmul_floor(z1, z2, repeats, chunk=1024):
  """Median time of 3 B x B x D matmuls, as a loss's forward + backward does them, in chunks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b, d = z1.shape
  chunk = min(chunk, b)

  @jax.jit
  def three_matmuls(x, y):
    def body(dx, yj):
      s = x @ yj.T  # (B, D) . (D, c) -> (B, c): similarities
      return dx + s @ yj, s.T @ x  # (B, c) . (c, D) and (c, B) . (B, D): both gradients

    return jax.lax.scan(body, jnp.zeros_like(x), y.reshape(b // chunk, chunk, d))

  _, times = _timed(lambda: jax.block_until_ready(three_matmuls(z1, z2)), repeats)
  return statistics.median(times)


def _errors(loss, grads, ref_impl, refs):
  """Absolute and relative differences of (loss, grads) from the reference point's."""
  record = dict(ref=ref_impl, max_abs_dloss=None, max_abs_dgrad=None, rel_dloss=None,
                rel_dgrad=None, grad_cosine=None)
  if ref_impl is None:
    return record
  with np.load(refs[ref_impl]) as ref:
    ref_loss, ref_grads = float(ref['loss']), [ref[k].astype(np.float64) for k in ('g1', 'g2')]
  grads = [np.asarray(g, np.float64) for g in grads]
  diff = [g - r for g, r in zip(grads, ref_grads)]
  norm = lambda xs: float(np.sqrt(sum(np.sum(x * x) for x in xs)))
  record.update(max_abs_dloss=float(abs(loss - ref_loss)),
                max_abs_dgrad=float(max(np.max(np.abs(x)) for x in diff)),
                rel_dloss=float(abs(loss - ref_loss) / abs(ref_loss)),
                rel_dgrad=norm(diff) / norm(ref_grads),
                grad_cosine=sum(float(np.sum(g * r)) for g, r in zip(grads, ref_grads)) /
                (norm(grads) * norm(ref_grads)))
  return record


def run_point(point):
  import jax  # pylint: disable=g-import-not-at-top

  b, d = point['batch'], point['dim']
  key1, key2 = jax.random.split(jax.random.key(0))  # the same inputs in every process
  z1 = jax.random.normal(key1, (b, d))
  if point['centres']:  # keys with cluster structure, as trained embeddings have
    key3, key4 = jax.random.split(jax.random.key(1))
    centres = jax.random.normal(key3, (point['centres'], d))
    z1 = centres[jax.random.randint(key4, (b,), 0, point['centres'])] + 0.5 * z1
  z2 = z1 + (0.3 if point['centres'] else 1.0) * jax.random.normal(key2, (b, d))
  step, result = (_torch_step if point['impl'] == 'torch' else _jax_step)(point, z1, z2)
  first, times = _timed(step, point['repeats'])
  record = dict(point, time_s=statistics.median(times) if times else first, times_s=times,
                first_call_s=first, peak_rss_gib=_peak_rss_gib())
  loss, grads, record['xla_gib'] = result()
  record['loss_value'] = float(loss)
  inputs = (f'_c{point["centres"]}' if point['centres'] else '') + (
      f'_t{point["temperature"]}' if point['temperature'] != TEMPERATURE else '')
  refs = {impl: os.path.join(point['ref_dir'], f'{point["loss"]}_{b}_{d}{inputs}{suffix}.npz')
          for impl, suffix in (('dense', ''), ('blockwise', '_blockwise'))}
  if point['impl'] in refs and point['devices'] == 1 and not point['collective']:
    np.savez(refs[point['impl']], loss=loss, g1=grads[0], g2=grads[1])
  order = ('blockwise', 'dense') if point['impl'] == 'pamc' else ('dense',)
  record.update(_errors(loss, grads, next((i for i in order if os.path.exists(refs[i])), None),
                        refs))
  record['floor_s'] = _matmul_floor(z1, z2, point['repeats']) if point['floor'] else None
  record['ratio'] = record['time_s'] / record['floor_s'] if record['floor_s'] else None
  for key in ('repeats', 'ref_dir', 'floor'):
    record.pop(key)
  return record


if __name__ == '__main__':
  main()
