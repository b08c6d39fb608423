r"""Images/s of the webdataset training pipeline (read + decode + crop + tokenize) against
open_clip's webdataset pipeline, on the same shards of photo-sized JPEGs, each timed alone.

  python benchmarks/input_pipeline.py --torch_python=/tmp/openclipenv/bin/python \
      >> benchmarks/results/input_pipeline.jsonl

Shards: the emoji renders (contrastive/data/emoji.py, 64 px) resized to a random 400-640 px
width and height with fine seeded noise (`shards._texture`), JPEG quality 90: ~100 KB each,
so decoding costs what a web photo's does. Written once to --shard_dir.

Implementations, each in its own process, one after the other (never two at once: on a
2-core machine two pipelines would share the cores):
  ours        `webdataset_loader.train_loader`: the config's random shuffle over all samples
              (the tar index gives random access), simplejpeg with DCT-domain downscale, the
              Inception crop of scale (0.9, 1.0) at --image_size, SentencePiece tokens,
              `--workers` grain worker processes; uint8 [B, S, S, 3] out.
  open_clip   benchmarks/openclip_pipeline.py in the torch environment: webdataset + Pillow
              decode + torchvision RandomResizedCrop (0.9, 1.0) bicubic + ToTensor + Normalize +
              open_clip's tokenizer, a torch DataLoader with the same number of workers; float32
              [B, 3, S, S] out (its pipeline's output; the conversion is part of its cost).
  ours_decode / pillow_decode   one core, no pipeline: our `image_decode.crop` against Pillow's
              full decode + the same crop + open_clip's bicubic resize, per image (what each
              pipeline's worker spends per sample).

Each prints one JSON line: images/s over --batches batches after --warmup_batches, per worker,
peak RSS (main process and the workers' sum), and the ratio to open_clip of the same run. The
last line sizes the pod step of the README's AOT table (SigLIP B/16, batch 32,768 on v5e-256
at ~91 ms: ~360k images/s over 64 hosts) in host cores at the measured per-worker rate.

Torch, open_clip and webdataset are not project dependencies (benchmarks/openclip_pipeline.py
says how to make their environment).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = dict(images_per_s=32768 / 0.091, hosts=64, step='SigLIP B/16, batch 32,768, v5e-256')


def make_shards(folder, num_shards, per_shard, seed=0):
  """Photo-sized JPEG shards from the emoji renders (once); returns their paths."""
  from contrastive.data import shards  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(folder, f'{s:05d}.tar') for s in range(num_shards)]
  if all(os.path.exists(p) for p in paths):
    return paths
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def records():
    for n, (image, caption, fields) in enumerate(shards.tfds_records('emoji_cldr', 'train')):
      if n == num_shards * per_shard:
        return
      h, w = (int(x) for x in rng.integers(400, 641, 2))
      big = shards._texture(image, max(h, w), rng)  # pylint: disable=protected-access
      yield np.asarray(Image.fromarray(big).resize((w, h))), caption, fields

  return shards.write(records(), folder, per_shard=per_shard, quality=90)[:num_shards]


class RssSampler:
  """Peak RSS (MiB) of this process's children, summed, sampled every 0.2 s."""

  def __init__(self):
    self.peak, self._stop = 0.0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    me = psutil.Process()
    while not self._stop.wait(0.2):
      try:
        rss = sum(c.memory_info().rss for c in me.children(recursive=True))
      except psutil.Error:
        continue
      self.peak = max(self.peak, rss / 2**20)

  def stop(self):
    self._stop.set()
    self._thread.join()
    return self.peak


def ours(args, paths):
  """Our pipeline's images/s (run in its own process: `--run pipeline`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from contrastive.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from contrastive.data import webdataset  # pylint: disable=g-import-not-at-top
  from contrastive.data import webdataset_loader  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  cfg = webdataset.settings(ml_collections.ConfigDict(dict(
      name='webdataset', image_size=args.image_size, crop_scale=(0.9, 1.0))))
  shards = webdataset.Shards(paths, cfg)
  captions = webdataset.CaptionSample(shards, 10_000, 0)
  texts = [r['text'] for r in captions.__getitems__(range(len(captions)))]
  tok = tokenizer_lib.train(texts, 2000, hard_vocab_limit=False)
  rows = webdataset_loader.TrainRows(shards, tok, 64, cfg)
  loader = webdataset_loader.train_loader(rows, global_batch_size=args.batch_size, seed=0,
                                          workers=args.workers)
  sampler = RssSampler()
  it = iter(loader)
  for _ in range(args.warmup_batches):
    next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  workers_rss = sampler.stop()
  it.close()
  assert batch['a'].shape == (args.batch_size, args.image_size, args.image_size, 3)
  return dict(seconds=seconds, peak_rss_mib_main=_own_peak_mib(),
              peak_rss_mib_workers_sum=workers_rss)


def _own_peak_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_only(args, paths, which):
  """One core, no pipeline: images/s of our crop or of Pillow's full decode + crop."""
  import io  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from contrastive.data import image_decode  # pylint: disable=g-import-not-at-top
  with tarfile.open(paths[0]) as tar:
    images = [tar.extractfile(m).read() for m in tar if m.name.endswith('.jpg')][:200]
  rng = np.random.default_rng(0)
  size = args.image_size

  def pillow(data):
    im = Image.open(io.BytesIO(data)).convert('RGB')
    top, left, h, w = image_decode.random_box(im.height, im.width, (0.9, 1.0), rng)
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC,  # open_clip's
                                box=(left, top, left + w, top + h)))

  fn = (lambda d: image_decode.crop(d, size, scale=(0.9, 1.0), rng=rng)) if which == 'ours' \
      else pillow
  for data in images[:20]:
    fn(data)
  start = time.perf_counter()
  for data in images:
    fn(data)
  return dict(seconds=time.perf_counter() - start, images=len(images))


def _subprocess(cmd):
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  if out.returncode:
    raise RuntimeError(f'{cmd[:3]} failed: {out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--shard_dir', default='/tmp/input_pipeline_shards')
  p.add_argument('--num_shards', type=int, default=4)
  p.add_argument('--per_shard', type=int, default=500)
  p.add_argument('--workers', default='1', help='comma-separated worker counts')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batches', type=int, default=30)
  p.add_argument('--warmup_batches', type=int, default=2)
  p.add_argument('--torch_python', default='')
  p.add_argument('--run', default='', help=argparse.SUPPRESS)  # a child: one measurement
  args = p.parse_args()
  paths = make_shards(args.shard_dir, args.num_shards, args.per_shard)
  if args.run:
    args.workers = int(args.workers)
    result = (ours(args, paths) if args.run == 'pipeline' else
              decode_only(args, paths, args.run.split('_')[0]))
    print(json.dumps(result))
    return
  common = dict(batch_size=args.batch_size, image_size=args.image_size, cores=os.cpu_count(),
                mean_sample_kib=float(np.mean([os.path.getsize(q) for q in paths]) /
                                      args.per_shard / 1024))
  base = [sys.executable, os.path.abspath(__file__), f'--shard_dir={args.shard_dir}',
          f'--num_shards={args.num_shards}', f'--per_shard={args.per_shard}',
          f'--batch_size={args.batch_size}', f'--image_size={args.image_size}',
          f'--batches={args.batches}', f'--warmup_batches={args.warmup_batches}']
  single = {w: _subprocess(base + [f'--run={w}_decode', '--workers=0'])
            for w in ('ours', 'pillow')}
  for which, r in single.items():
    print(json.dumps(dict(common, impl=f'{which}_decode', workers=0,
                          images_per_s=r['images'] / r['seconds'],
                          ratio_vs_pillow=(r['images'] / r['seconds']) / (
                              single['pillow']['images'] / single['pillow']['seconds']))))
  per_worker = None
  for workers in (int(w) for w in args.workers.split(',')):
    results = {'ours': _subprocess(base + ['--run=pipeline', f'--workers={workers}'])}
    if args.torch_python:
      results['open_clip'] = _subprocess([
          args.torch_python, os.path.join(ROOT, 'benchmarks', 'openclip_pipeline.py'),
          '--shards', *paths, f'--workers={workers}', f'--batch_size={args.batch_size}',
          f'--image_size={args.image_size}', f'--batches={args.batches}',
          f'--warmup_batches={args.warmup_batches}'])
    rate = {k: args.batches * args.batch_size / v['seconds'] for k, v in results.items()}
    for impl, r in results.items():
      line = dict(common, impl=impl, workers=workers, images_per_s=rate[impl],
                  images_per_s_per_worker=rate[impl] / max(workers, 1),
                  peak_rss_mib_main=r['peak_rss_mib_main'],
                  peak_rss_mib_workers_sum=r['peak_rss_mib_workers_sum'])
      if 'open_clip' in rate:
        line['ratio_vs_open_clip'] = rate[impl] / rate['open_clip']
      print(json.dumps(line), flush=True)
    per_worker = rate['ours'] / max(workers, 1)
  per_host = POD['images_per_s'] / POD['hosts']
  print(json.dumps(dict(impl='pod_sizing', step=POD['step'], images_per_s_pod=POD['images_per_s'],
                        images_per_s_per_host=per_host, ours_images_per_s_per_worker=per_worker,
                        host_cores_needed=per_host / per_worker)))


if __name__ == '__main__':
  main()
