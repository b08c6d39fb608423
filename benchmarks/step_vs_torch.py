"""The default recipe's SimCLR train step in JAX against the same network in PyTorch on the CPU.

Implementations, each in its own worker process (own peak RSS, own thread pools):
  jax                  the step that `contrastive.main` runs (benchmarks/step_overhead.py builds
                       it from configs/simclr_fmnist.py: on-device augmentations, ResNet, BatchNorm,
                       head, NT-Xent, AdamW) on `--devices` CPU devices ('auto': one per core as
                       the trainer chooses, `parallel.default_cpu_devices`; and 1 for reference);
  torch_eager          a PyTorch equivalent: same architecture and parameter count (asserted),
                       batched on-tensor augmentations (crop + flip as one affine_grid/grid_sample,
                       brightness/contrast jitter), NT-Xent, AdamW, torch.set_num_threads(cores);
  torch_channels_last  the same with the model and input in channels-last memory format;
  torch_compile        the same step (augment + model + loss) under torch.compile;
  main_loop            not a step alone: the whole `python -m contrastive.main` loop on the
                       default config at the batch (data, augmentation, step, metric syncs,
                       logging, checkpoint), its step time from metrics.jsonl's steps_per_s
                       over 5-step intervals, so the loop's host overhead shows beside `jax`.

Levers: --xla_flags='NAME:FLAGS;...' adds the jax step with XLA_FLAGS=FLAGS (e.g. YNNPACK's
fusions off: 'no_ynn:--xla_cpu_experimental_ynn_fusion_type='), one JSON line each with its
`lever` name; a NAME ending in '+xla_conv' also gives the convolutions XLA's own gradients
(`conv.Conv`'s path off the CPU) instead of the chunked im2col kernel gradients.
benchmarks/step_profile.py shows where a step's time goes.

Each implementation is timed alone: --runs whole runs per implementation, alternated A B A B
... (so a shared machine's drift hits all alike), each in a fresh process that runs 2 warm-up
steps (the first compiles) and --rounds timed steps while nothing else of this benchmark runs.
One JSON line per (impl, batch): the median over runs of each run's median step, the runs'
medians and their spread, the ratio to torch_eager alone, the worker's peak RSS, and, as a
secondary column, the interleaved median (`interleaved_time_s`: one step of every
implementation in turn, their thread pools competing for the same cores, which costs torch
10-30% on 2 cores and so flatters the JAX step).

Torch is not a project dependency; it runs from its own environment:

  python3 -m venv --system-site-packages /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  PYTHONPATH=. python benchmarks/step_vs_torch.py --torch_python=/tmp/torchenv/bin/python \\
      >> benchmarks/results/step_vs_torch.jsonl   # on an otherwise idle machine

Padding differs in alignment only: Flax 'SAME' pads stride-2 3x3 convolutions (0, 1) on even
inputs, PyTorch padding=1 pads (1, 1); output shapes and FLOPs are equal.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import interleaved  # benchmarks/interleaved.py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_IMPLS = ('torch_eager', 'torch_channels_last', 'torch_compile')


def _images(batch, i):
  """The uint8 batch [B, 28, 28, 1] of step i, the same for every implementation."""
  return np.random.default_rng(i).integers(0, 256, (batch, 28, 28, 1), np.uint8)


# ---- JAX worker ------------------------------------------------------------------------------


def jax_worker(point):
  """fn(i) -> seconds of train step i, and the parameter count."""
  if point.get('xla_flags'):  # a lever (--xla_flags), read when the backend starts
    os.environ['XLA_FLAGS'] = point['xla_flags']
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', point['devices'])  # before the backend starts
  import step_overhead  # pylint: disable=g-import-not-at-top
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive.models import build_model  # pylint: disable=g-import-not-at-top
  from contrastive.models import conv  # pylint: disable=g-import-not-at-top

  if (point.get('lever') or '').endswith('+xla_conv'):  # XLA's own convolution gradients,
    conv.target_backend('gpu').__enter__()  # as off the CPU, for the worker's whole life

  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'simclr_fmnist.py'))
  shapes = jax.eval_shape(lambda: build_model(config.model).init(
      jax.random.key(0), jax.numpy.zeros((2, 28, 28, 1), jax.numpy.uint8), train=False))
  count = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert jax.device_count() == point['devices'], jax.devices()
  return step_overhead.build_variant('simclr_fmnist.py', '', point['batch']), count


# ---- PyTorch worker --------------------------------------------------------------------------


def torch_worker(point):
  """fn(i) -> seconds of train step i, and the parameter count (torch imported here only)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(interleaved.cores())
  torch.manual_seed(0)
  cfg = point['config']
  model_cfg, aug, opt_cfg = cfg['model'], cfg['augment'], cfg['optimizer']
  bn = lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)  # flax momentum 0.9

  class Block(nn.Module):  # resnet.BasicBlock
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout)
      self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout)
      nn.init.zeros_(self.bn2.weight)  # flax: scale_init=zeros
      self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))
                   if cin != cout or stride != 1 else nn.Identity())

    def forward(self, x):  # [N, C, H, W] -> [N, cout, H / stride, W / stride]
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(self.proj(x) + y)

  width, layers, cin = model_cfg['width'], [], model_cfg['width']
  for i, n in enumerate(model_cfg['stage_sizes']):
    for j in range(n):
      layers.append(Block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
      cin = width * 2**i
  trunk = nn.Sequential(
      nn.Conv2d(1, width, 3, model_cfg['stem_strides'], 1, bias=False), bn(width), nn.ReLU(),
      *layers)
  with torch.no_grad():  # the last feature map's H = W on the 28 x 28 images (_images)
    side = trunk.eval()(torch.zeros(1, 1, 28, 28)).shape[-1]
  # resnet.ResNet.pool: 'flatten' keeps the [C, H, W] map (the order of the features does not
  # change the cost), 'avg' pools it.
  flatten = model_cfg.get('pool', 'avg') == 'flatten'
  head, dim = [], cin * side * side if flatten else cin
  for hidden in model_cfg['head_hidden_dims']:  # heads.ProjectionHead
    head += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden, momentum=0.1), nn.ReLU()]
    dim = hidden
  pool = [nn.Flatten()] if flatten else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  model = nn.Sequential(*trunk, *pool, *head, nn.Linear(dim, model_cfg['head_out_dim']))
  count = sum(p.numel() for p in model.parameters())
  decay = [p for p in model.parameters() if p.ndim > 1]  # optim.decay_mask: kernels only
  rest = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=opt_cfg['weight_decay']),
                           dict(params=rest, weight_decay=0.0)], lr=opt_cfg['lr'],
                          betas=(0.9, 0.999), foreach=True)
  channels_last = point['impl'] == 'torch_channels_last'
  if channels_last:
    model = model.to(memory_format=torch.channels_last)

  def view(x):
    """augment.simclr_view on a batch: x [N, 1, H, W] float in [0, 1] -> [N, 1, H, W]."""
    n = x.shape[0]
    u = lambda lo=0.0, hi=1.0: torch.rand(n) * (hi - lo) + lo
    area, r = u(*aug['crop_scale']), torch.exp(u(np.log(3 / 4), np.log(4 / 3)))
    ch, cw = torch.sqrt(area / r).clamp(max=1.0), torch.sqrt(area * r).clamp(max=1.0)
    cy, cx = (u() * (1 - ch) + ch / 2) * 2 - 1, (u() * (1 - cw) + cw / 2) * 2 - 1
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if aug['flip'] else torch.ones(n)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([cw * flip, zero, cx], 1),
                         torch.stack([zero, ch, cy], 1)], 1)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    fb = u(1 - aug['brightness'], 1 + aug['brightness']).view(n, 1, 1, 1)
    fc = u(1 - aug['contrast'], 1 + aug['contrast']).view(n, 1, 1, 1)
    bright = lambda y: (y * fb).clamp(0, 1)
    contrast = lambda y: ((y - y.mean((1, 2, 3), keepdim=True)) * fc
                          + y.mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    order = (torch.rand(n) < 0.5).view(n, 1, 1, 1)  # random order of the two ops
    jittered = torch.where(order, contrast(bright(x)), bright(contrast(x)))
    x = torch.where((torch.rand(n) < aug['jitter_prob']).view(n, 1, 1, 1), jittered, x)
    return x.clamp(0, 1)

  def loss_fn(images):
    """images [B, 1, H, W] uint8 -> NT-Xent of the interleaved views' embeddings."""
    b, x = images.shape[0], images.float() / 255.0
    views = torch.stack([view(x), view(x)], 1).reshape(2 * b, *x.shape[1:])  # [2B, 1, H, W]
    if channels_last:
      views = views.contiguous(memory_format=torch.channels_last)
    z = model(views).view(b, 2, -1)
    z = F.normalize(torch.cat([z[:, 0], z[:, 1]]), dim=1)  # [2B, D]
    logits = (z @ z.T / cfg['temperature']).masked_fill(
        torch.eye(2 * b, dtype=torch.bool), float('-inf'))  # (2B, D) . (D, 2B) -> (2B, 2B)
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(logits, targets)

  forward = torch.compile(loss_fn) if point['impl'] == 'torch_compile' else loss_fn
  model.train()

  def run(i):
    images = torch.from_numpy(_images(point['batch'], i)).permute(0, 3, 1, 2)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = forward(images)
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):
      raise FloatingPointError(f'{point["impl"]}: loss {loss.item()} at step {i}')
    return time.perf_counter() - start

  return run, count


def main_loop_run(point, rounds, workdir):
  """The whole `contrastive.main` loop (data, augmentation, step, metrics, logging) on the
  default config at the point's batch: the median step time over 5-step logging intervals
  (metrics.jsonl's steps_per_s, evaluations excluded), the first interval (compiling) dropped."""
  every = 5
  steps = every * (1 + max(1, -(-rounds // every)))
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for name in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES'):  # the trainer picks its device count
    env.pop(name, None)
  subprocess.run([sys.executable, '-m', 'contrastive.main', '--config',
                  os.path.join(ROOT, 'configs', 'simclr_fmnist.py'), '--workdir', workdir,
                  f'--config.batch_size={point["batch"]}', f'--config.total_steps={steps}',
                  f'--config.log_every={every}', '--config.eval.random_init_baseline=False',
                  '--config.eval.max_train_examples=2000', '--config.eval.max_test_examples=1000',
                  '--config.eval.linear_steps=10', '--config.eval.fewshot.num_episodes=10'],
                 cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rates = [row['steps_per_s'] for row in map(json.loads, f) if 'steps_per_s' in row]
  shutil.rmtree(workdir, ignore_errors=True)
  return statistics.median(1 / r for r in rates[1:])


def worker(point):
  """One implementation's process (`interleaved.serve`)."""
  run, count = (jax_worker if point['impl'] == 'jax' else torch_worker)(point)
  interleaved.serve(lambda i: dict(time_s=run(i)), count)


# ---- Orchestrator ----------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--batch_sizes', default='256,512')
  p.add_argument('--devices', default='auto,1', help="JAX CPU device counts; 'auto': the trainer's")
  p.add_argument('--impls', default='jax,main_loop,' + ','.join(TORCH_IMPLS))
  p.add_argument('--xla_flags', default='',
                 help="levers: 'NAME:FLAGS;NAME:FLAGS', each the jax step at the trainer's "
                      "device count with XLA_FLAGS=FLAGS, e.g. 'no_ynn:"
                      "--xla_cpu_experimental_ynn_fusion_type='")
  p.add_argument('--rounds', type=int, default=15, help='timed steps per run')
  p.add_argument('--runs', type=int, default=3,
                 help='fresh-process runs of each implementation alone, alternated A B A B')
  p.add_argument('--interleaved', type=int, default=1,
                 help='1: also the interleaved median (a secondary column)')
  p.add_argument('--torch_python', default=sys.executable,
                 help='a python that imports torch (and sees this repository)')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # internal: one worker
  args = p.parse_args(argv)
  if args.worker is not None:
    worker(json.loads(args.worker))
    return
  from contrastive import config_lib  # pylint: disable=g-import-not-at-top
  from contrastive import parallel  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'simclr_fmnist.py'))
  shared = dict(model=config.model.to_dict(), augment=config.augment.to_dict(),
                optimizer=config.optimizer.to_dict(), temperature=config.loss.temperature)
  assert config.loss.name == 'nt_xent' and config.optimizer.name == 'adamw', config
  for batch in map(int, args.batch_sizes.split(',')):
    auto = parallel.default_cpu_devices([batch, config.eval.batch_size], env={}) or 1
    points = []
    for impl in args.impls.split(','):
      counts = ([auto if d == 'auto' else int(d) for d in args.devices.split(',')]
                if impl == 'jax' else [auto] if impl == 'main_loop' else [1])
      for devices in dict.fromkeys(counts):  # 'auto,1' on one core: once
        points.append(dict(impl=impl, batch=batch, devices=devices, config=shared))
    for lever in filter(None, args.xla_flags.split(';')):
      name, flags = lever.split(':', 1)
      points.append(dict(impl='jax', batch=batch, devices=auto, config=shared, lever=name,
                         xla_flags=flags))
    python = lambda pt: sys.executable if pt['impl'] == 'jax' else args.torch_python
    alone = [[] for _ in points]  # per point: the median step of each of its runs alone
    rss, params = [0.0] * len(points), [None] * len(points)
    for _ in range(args.runs):  # whole runs alternated A B A B ..., each in a fresh process
      for k, pt in enumerate(points):
        if pt['impl'] == 'main_loop':
          with tempfile.TemporaryDirectory() as tmp:
            alone[k].append(main_loop_run(pt, args.rounds, os.path.join(tmp, 'workdir')))
          continue
        w = interleaved.Worker(python(pt), __file__, pt)
        params[k] = w.params
        times = [w.step(i)['time_s'] for i in range(2 + args.rounds)]  # 2: compile, warm up
        alone[k].append(statistics.median(times[2:]))
        rss[k] = max(rss[k], w.close())
    assert len(set(params) - {None}) <= 1, f'parameter counts differ: {list(zip(points, params))}'
    workers = [k for k, pt in enumerate(points) if pt['impl'] != 'main_loop']
    inter = (dict(zip(workers, interleaved_medians([points[k] for k in workers], python,
                                                   args.rounds)))
             if args.interleaved else {})
    medians = [statistics.median(t) for t in alone]
    base = next((m for pt, m in zip(points, medians) if pt['impl'] == 'torch_eager'), None)
    for k, (pt, m) in enumerate(zip(points, medians)):
      print(json.dumps(dict(
          impl=pt['impl'], lever=pt.get('lever'), xla_flags=pt.get('xla_flags'), batch=batch,
          devices=pt['devices'], cores=interleaved.cores(), params=params[k], mode='alone',
          runs=args.runs, rounds=args.rounds,
          time_s=round(m, 4), run_medians_s=[round(x, 4) for x in alone[k]],
          spread_s=[round(min(alone[k]), 4), round(max(alone[k]), 4)],
          ratio_vs_torch_eager=None if base is None else round(m / base, 3),
          interleaved_time_s=round(inter[k], 4) if k in inter else None,
          peak_rss_gib=round(rss[k], 3) if rss[k] else None)), flush=True)


def interleaved_medians(points, python, rounds):
  """The secondary measurement: one worker per point, one step of each in turn per round
  (their thread pools then compete for the same cores); the median step of each."""
  workers = [interleaved.Worker(python(pt), __file__, pt) for pt in points]
  times = [[w.step(0)['time_s'], w.step(1)['time_s']] for w in workers]  # compile, warm up
  for r in range(rounds):
    for w, t in zip(workers, times):
      t.append(w.step(2 + r)['time_s'])
  for w in workers:
    w.close()
  return [statistics.median(t[2:]) for t in times]

if __name__ == '__main__':
  main()
