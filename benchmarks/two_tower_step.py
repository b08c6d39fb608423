"""The two-tower train step (CLIP / SigLIP) of this codebase against open_clip's on the CPU.

Implementations, each in its own worker process (own peak RSS, own thread pools):
  ours_dense      `step.update` with `objectives.two_tower` as `recipes.two_tower.step` builds it
                  from configs/clip_emoji.py or siglip_emoji.py (ViT `small` + text `small`,
                  embed 128, learned logit scale (and bias), AdamW with clipping at 1.0, logit
                  lr x10), jitted over `--devices` CPU devices ('auto': one per core, as the
                  trainer chooses, `parallel.default_cpu_devices`; and 1);
  ours_blockwise  the same with the loss's blockwise path (`--block_size`, ring on the mesh);
  ours_gradcache  ours_dense with GradCache (`--micro_batch` rows embedded at a time, the
                  same gradient: contrastive/grad_cache.py), whose towers' activations are
                  those of one micro-batch, not of the batch;
  open_clip       `open_clip.CLIP` built from a model config dict with the same sizes,
                  `ClipLoss` / `SigLipLoss`, torch.optim.AdamW (decay on ndim >= 2, logit lr
                  x10), clip_grad_norm_(1.0), the logit-scale clamp of open_clip's training
                  loop, torch.set_num_threads(t) for each t of --torch_threads (default: the
                  cores; the first is the ratios' base).

Inputs: images [B, 32, 32, 3] uint8 and tokens [B, 16] uniform in [1, 1000) (no padding), the
same arrays for every implementation (seeded by step). The orchestrator
(benchmarks/interleaved.py) starts the workers of one (batch, loss) together and sends "step i"
to each in turn (one step of every implementation per round, so a shared machine's drift hits
all alike), then prints one JSON line per worker: median seconds over --rounds after 2 warm-up
steps (the first compiles), all times, ratio_vs_open_clip (to the first open_clip worker of the
same run), parameter count, threads (open_clip), the first 3 losses, peak RSS (ru_maxrss) and
the load average (`os.getloadavg`) before and after. Under load from other processes torch's
OpenMP barriers stall when a thread is descheduled, so `--torch_threads=cores,1` also times
open_clip on 1 thread.

Torch and open_clip are not project dependencies; they run from their own environment. (The
CPU wheel index is unreachable here and torchvision 0.28 from PyPI needs CUDA torch, so the
environment holds PyPI's torch 2.14.1, which runs on the CPU as the +cpu build does):

  python3 -m venv --system-site-packages /tmp/openclipenv
  /tmp/openclipenv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0
  python benchmarks/two_tower_step.py --torch_python=/tmp/openclipenv/bin/python \\
      >> benchmarks/results/two_tower_step.jsonl

The recorded results (the README's table; the idle 2 cores, fewer points and rounds to fit
the time, ~45 min): `--batch_sizes=256,1024 --impls=ours_dense,ours_blockwise,ours_gradcache,
open_clip --devices=auto --torch_threads=cores,1 --micro_batch=128 --rounds=3`; batch 256 again
with `--devices=auto,1 --rounds=10`; batch 4096 with `--impls=ours_gradcache,open_clip`; the
dense and blockwise steps at 4096 alone (one loss and `--impls=ours_dense` or
`--impls=ours_blockwise` a run, `--rounds=2`). The workers of one
(batch, loss) are alive together, and the dense step's peak RSS grows ~4.5 GiB per 1000 rows
(the towers' saved activations, not the [B, B] loss; open_clip's ~2.5): at 4096 it needs
~20 GiB (open_clip ~11), so it runs alone on a 23 GiB machine.

Architecture differences (counts printed and recorded: ours 1,565,569 (CLIP) / 1,565,570
(SigLIP), open_clip 1,434,497 / 1,434,498; ours has 131,072 more, the MAP head's MLP):
- Image pooling: ours `map` (SigLIP's MAP head: probe, attention, LN + residual MLP 128-512-128);
  open_clip `attentional_pool=True` with 1 query, 4 heads (its CoCa pooler: LN on probe and
  keys, attention, no MLP) then ln_post. `--pool=gap` compares ours 'gap' with open_clip 'avg'.
- ViT: open_clip adds a class token (unused by its pooling, but in the attention: 65 tokens vs
  64) and ln_pre; its patch embedding is a bias-free stride-4 conv, ours a Dense with bias on
  flattened patches. Both pre-LN blocks, q/k/v/out with biases; GELU: ours flax's tanh
  approximation, open_clip's exact (erf).
- Text: both bidirectional (open_clip `no_causal_mask=True`), pooled at the last token
  (ours 'eos' = last non-pad = position 15 on these unpadded tokens; open_clip 'last').
- Loss: ours masks rows sharing an id (all distinct here) and clips the CLIP scale inside the
  forward; open_clip clamps logit_scale after the step. Our lr has a warm-up schedule (step
  cost only); open_clip's is constant here.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import interleaved  # benchmarks/interleaved.py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'clip': 'clip_emoji.py', 'siglip': 'siglip_emoji.py'}
IMAGE, CONTEXT, VOCAB = 32, 16, 1000
PATCH = 4  # the recorded runs' ViT patches (the recipes' default is now 8: 4x fewer tokens)


def _batch(batch, i):
  """(images [B, 32, 32, 3] uint8, tokens [B, 16] int32) of step i, the same for every impl."""
  rng = np.random.default_rng(i)
  return (rng.integers(0, 256, (batch, IMAGE, IMAGE, 3), np.uint8),
          rng.integers(1, VOCAB, (batch, CONTEXT)).astype(np.int32))


# ---- Our step --------------------------------------------------------------------------------


def ours_worker(point):
  """fn(i) -> (seconds, loss) of train step i, and the parameter count."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', point['devices'])  # before the backend starts
  from contrastive import config_lib, objectives, parallel  # pylint: disable=g-import-not-at-top
  from contrastive import step as step_lib  # pylint: disable=g-import-not-at-top
  from contrastive.recipes import two_tower_init  # pylint: disable=g-import-not-at-top
  from contrastive.recipes import two_tower_model  # pylint: disable=g-import-not-at-top
  from contrastive.models import two_tower as two_tower_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(os.path.join(ROOT, 'configs', CONFIGS[point['loss']]))
  config.batch_size = point['batch']
  config.model.image.pool = point['pool']
  config.model.image.patch = PATCH
  config.tokenizer.update(vocab_size=VOCAB, context=CONTEXT)
  model = two_tower_lib.build_two_tower(two_tower_model.model_config(config))
  assert jax.device_count() == point['devices'], jax.devices()
  mesh = parallel.make_mesh([('data', -1)])
  inputs = (np.zeros((2, IMAGE, IMAGE, 3), np.uint8), np.zeros((2, CONTEXT), np.int32))
  rng = jax.random.key(0)
  abstract = jax.eval_shape(lambda r: model.init(r, *inputs, train=False), rng)
  tx, schedule = two_tower_init.optimizer(config.optimizer, abstract['params'], 1000,
                                          batch_size=config.batch_size)
  state = step_lib.create_train_state(model, tx, None, rng, mesh, inputs=inputs)
  block_size = point['block_size']
  objective = objectives.two_tower(model=model, loss_name=config.loss.name,
                                   block_size=block_size, mesh=mesh if block_size else None)
  step = step_lib.jit_train_step(mesh, state, step_fn=step_lib.update, objective=objective,
                                 tx=tx, schedule=schedule,
                                 micro_batch_size=point.get('micro_batch') or 0)
  count = sum(x.size for x in jax.tree.leaves(state.params))
  b, sharding = point['batch'], parallel.data_sharding(mesh)
  ids, truncated = np.arange(b, dtype=np.int32), np.zeros(b, np.int32)
  holder = {'state': state}

  def run(i):
    images, tokens = _batch(b, i)
    start = time.perf_counter()
    batch = jax.device_put({'a': images, 'b': tokens, 'id': ids, 'truncated': truncated},
                           sharding)
    holder['state'], metrics = step(holder['state'], batch, jax.random.key(i))
    loss = float(jax.block_until_ready((holder['state'], metrics))[1]['loss'])
    return time.perf_counter() - start, loss

  return run, count


# ---- open_clip's step ------------------------------------------------------------------------


def open_clip_worker(point):
  """fn(i) -> (seconds, loss) of train step i, and the parameter count (torch imported here)."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(point['threads'])
  torch.manual_seed(0)
  siglip = point['loss'] == 'siglip'
  pool = (dict(attentional_pool=True, attn_pooler_queries=1, attn_pooler_heads=4,
               pool_type='tok') if point['pool'] == 'map' else dict(pool_type='avg'))
  model = open_clip.CLIP(
      embed_dim=128,
      vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=128, layers=4, head_width=32,
                      mlp_ratio=4.0, **pool),
      text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=128, heads=4, layers=2,
                    mlp_ratio=4.0, no_causal_mask=True, pool_type='last'),
      init_logit_scale=math.log(10.0) if siglip else math.log(1 / 0.07),
      init_logit_bias=-10.0 if siglip else None)
  loss_fn = open_clip.loss.SigLipLoss() if siglip else open_clip.loss.ClipLoss()
  count = sum(p.numel() for p in model.parameters())
  named = list(model.named_parameters())
  logit = [p for n, p in named if n.startswith('logit_')]
  decay = [p for n, p in named if p.ndim >= 2 and not n.startswith('logit_')]
  rest = [p for n, p in named if p.ndim < 2 and not n.startswith('logit_')]
  lr = 1e-3
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=1e-4),
                           dict(params=rest, weight_decay=0.0),
                           dict(params=logit, weight_decay=0.0, lr=10 * lr)],
                          lr=lr, betas=(0.9, 0.999))
  model.train()

  def run(i):
    images, tokens = _batch(point['batch'], i)
    start = time.perf_counter()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    opt.zero_grad(set_to_none=True)
    out = model(x, torch.from_numpy(tokens).long())  # normalised features, exp(logit_scale)
    loss = loss_fn(*out)  # ClipLoss(za, zb, scale) / SigLipLoss(za, zb, scale, bias)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))  # open_clip's training loop does this
    return time.perf_counter() - start, loss.item()

  return run, count


def worker(point):
  """One implementation's process (`interleaved.serve`); a non-finite loss stops it."""
  run, count = (open_clip_worker if point['impl'] == 'open_clip' else ours_worker)(point)

  def step(i):
    seconds, loss = run(i)
    if not math.isfinite(loss):
      raise FloatingPointError(f'{point["impl"]}: loss {loss} at step {i}')
    return dict(time_s=seconds, loss=loss)

  interleaved.serve(step, count)


# ---- Orchestrator ----------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--batch_sizes', default='256,1024,4096')
  p.add_argument('--losses', default='clip,siglip')
  p.add_argument('--impls', default='ours_dense,ours_blockwise,open_clip')
  p.add_argument('--devices', default='auto,1', help="our CPU device counts; 'auto': the trainer's")
  p.add_argument('--block_size', type=int, default=256)
  p.add_argument('--micro_batch', type=int, default=256, help='ours_gradcache: rows at a time')
  p.add_argument('--pool', default='map', choices=['map', 'gap'], help='image tower pooling')
  p.add_argument('--rounds', type=int, default=5, help='timed steps after 2 warm-up steps')
  p.add_argument('--torch_threads', default='cores',
                 help="torch.set_num_threads for open_clip workers, e.g. 'cores,1'")
  p.add_argument('--torch_python', default=sys.executable,
                 help='a python that imports torch and open_clip')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # internal: one worker
  args = p.parse_args(argv)
  if args.worker is not None:
    worker(json.loads(args.worker))
    return
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  for batch in map(int, args.batch_sizes.split(',')):
    auto = parallel.default_cpu_devices([batch], env={}) or 1
    for loss in args.losses.split(','):
      points = []
      for impl in args.impls.split(','):
        counts = ([auto if d == 'auto' else int(d) for d in args.devices.split(',')]
                  if impl != 'open_clip' else [1])
        for devices in dict.fromkeys(counts):  # 'auto,1' on one core: once
          points.append(dict(impl=impl, loss=loss, batch=batch, devices=devices, pool=args.pool,
                             block_size=args.block_size if impl == 'ours_blockwise' else None,
                             micro_batch=args.micro_batch if impl == 'ours_gradcache' else None))
        if impl == 'open_clip':  # one worker per thread count, the first is the ratios' base
          points[-1:] = [dict(points[-1],
                              threads=int(t) if t != 'cores' else interleaved.cores())
                         for t in args.torch_threads.split(',')]
      load_start = os.getloadavg()
      workers = [interleaved.Worker(
          args.torch_python if pt['impl'] == 'open_clip' else sys.executable, __file__, pt)
                 for pt in points]
      print(f'batch {batch} {loss}: parameters ' +
            ', '.join(f'{pt["impl"]}={w.params:,}' for pt, w in zip(points, workers)),
            file=sys.stderr, flush=True)
      steps = [[w.step(0), w.step(1)] for w in workers]  # compile, then warm up
      for r in range(args.rounds):  # interleaved rounds
        for w, s in zip(workers, steps):
          s.append(w.step(2 + r))
      load_end = os.getloadavg()
      medians = [statistics.median(x['time_s'] for x in s[2:]) for s in steps]
      base = next((m for pt, m in zip(points, medians) if pt['impl'] == 'open_clip'), None)
      for pt, w, s, m in zip(points, workers, steps, medians):
        print(json.dumps(dict(
            impl=pt['impl'], loss=loss, batch=batch, devices=pt['devices'],
            cores=interleaved.cores(),
            block_size=pt['block_size'], collective='ring' if pt['block_size'] else None,
            micro_batch=pt['micro_batch'],
            threads=pt.get('threads'), pool=args.pool, params=w.params, time_s=round(m, 4),
            times_s=[round(x['time_s'], 4) for x in s], first_call_s=round(s[0]['time_s'], 2),
            ratio_vs_open_clip=None if base is None else round(m / base, 3),
            peak_rss_gib=round(w.close(), 3), losses=[round(x['loss'], 4) for x in s[:3]],
            loadavg_start=[round(x, 2) for x in load_start],
            loadavg_end=[round(x, 2) for x in load_end])), flush=True)


if __name__ == '__main__':
  main()
