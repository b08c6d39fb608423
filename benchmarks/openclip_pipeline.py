"""Images per second of open_clip's webdataset training input pipeline, on the CPU.

Measures the pipeline that open_clip's `open_clip_train/data.py` `get_wds_dataset` builds for
training on tar shards (its default, not `--dataset-resampled`): shard list, deterministic shard
shuffle, split by node and by DataLoader worker, tar -> samples, keep samples with an image and
a caption, decode 'pilrgb', rename image 'jpg;png;jpeg;webp' and text 'txt', map the image
through `open_clip.image_transform(S, is_train=True)` (RandomResizedCrop scale (0.9, 1.0)
bicubic, RGB, ToTensor, Normalize) and the caption through the ViT-B-16 tokenizer, tuple,
batch in the dataset, `with_epoch` batches per worker, then a
`torch.utils.data.DataLoader(batch_size=None, num_workers=W, persistent_workers=W > 0)` as
open_clip's `WebLoader` does. `with_epoch` repeats each worker's shards, so shards smaller than
the run are read again.

Differences from open_clip, none of which changes the work per image:
  - no sample-level shuffle buffer (open_clip: `wds.shuffle(5000, initial=1000)` after the tar
    reader). It holds encoded samples only, so it costs memory (up to 5000 encoded samples per
    worker) and a start-up delay, not time per image; leaving it out keeps the RSS figures about
    the decode/transform work;
  - errors re-raise instead of open_clip's log-and-continue, so a broken shard fails the run
    instead of being timed as a fast one.

Timing: `--warmup_batches` batches first (they start the workers), then the wall clock from
requesting the first of `--batches` timed batches to receiving the last. The workers prefetch
2 batches each during the warm-up, so use --batches well above 2 * workers. The worker RSS is
the max over the run of the sum of the worker processes' RSS (psutil, every 0.2 s); forked
workers share the parent's pages copy-on-write and each counts them.

Torch is not a project dependency; it runs from its own environment (never the main Python; this
script imports neither jax nor `contrastive`):

  python3 -m venv /tmp/openclipenv
  /tmp/openclipenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/openclipenv/bin/pip install open-clip-torch webdataset psutil
  /tmp/openclipenv/bin/python benchmarks/openclip_pipeline.py \\
      --shards /tmp/shards/0000{0..3}.tar --workers 2 --batch_size 64 --batches 32

Prints one JSON line.
"""

import argparse
import functools
import json
import math
import resource
import threading
import time

import braceexpand
import open_clip
import psutil
import torch
import torchvision
import webdataset as wds

SHARD_SHUFFLE_SIZE = 2000  # open_clip's _SHARD_SHUFFLE_SIZE / _SHARD_SHUFFLE_INITIAL
SHARD_SHUFFLE_INITIAL = 500
RSS_PERIOD_S = 0.2


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shards', nargs='+', required=True,
                      help='tar paths, or brace patterns such as "dir/{00000..00003}.tar"')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--warmup_batches', type=int, default=2)
  parser.add_argument('--batches', type=int, default=8)
  parser.add_argument('--torch_threads', type=int, default=1)
  return parser.parse_args()


def has_image_and_text(sample):
  """open_clip's filter_no_caption_or_no_image."""
  return 'txt' in sample and any(k in sample for k in ('png', 'jpg', 'jpeg', 'webp'))


def tokenize_caption(tokenizer, text):
  return tokenizer(text)[0]


def build_dataset(shards, batch_size, image_size, batches_per_worker):
  tokenizer = open_clip.get_tokenizer('ViT-B-16')
  preprocess = open_clip.image_transform(image_size, is_train=True)
  pipeline = wds.DataPipeline(
      wds.SimpleShardList(shards),
      wds.detshuffle(bufsize=SHARD_SHUFFLE_SIZE, initial=SHARD_SHUFFLE_INITIAL, seed=0),
      wds.split_by_node,
      wds.split_by_worker,
      wds.tarfile_to_samples(handler=wds.reraise_exception),
      wds.select(has_image_and_text),
      wds.decode('pilrgb', handler=wds.reraise_exception),
      wds.rename(image='jpg;png;jpeg;webp', text='txt'),
      wds.map_dict(image=preprocess, text=functools.partial(tokenize_caption, tokenizer)),
      wds.to_tuple('image', 'text'),
      wds.batched(batch_size, partial=False),
  )
  return pipeline.with_epoch(batches_per_worker)


def set_threads(threads, worker_id=None):
  del worker_id  # the DataLoader's worker_init_fn argument
  torch.set_num_threads(threads)


def build_loader(dataset, workers, threads):
  return torch.utils.data.DataLoader(
      dataset, batch_size=None, shuffle=False, num_workers=workers,
      persistent_workers=workers > 0,
      worker_init_fn=functools.partial(set_threads, threads) if workers else None)


class WorkerRssSampler:
  """Max over time of the summed RSS of this process's children, sampled from a thread."""

  def __init__(self):
    self.peak_bytes = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self):
    total = 0
    for child in psutil.Process().children(recursive=True):
      try:
        total += child.memory_info().rss
      except psutil.NoSuchProcess:
        pass
    self.peak_bytes = max(self.peak_bytes, total)

  def _run(self):
    while not self._stop.wait(RSS_PERIOD_S):
      self._sample()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._sample()
    self._stop.set()
    self._thread.join()


def next_checked(batches, batch_size, image_size):
  images, texts = next(batches)
  assert images.shape == (batch_size, 3, image_size, image_size), images.shape
  assert images.dtype == torch.float32 and texts.shape == (batch_size, 77), texts.shape
  return images


def time_batches(loader, args):
  """Seconds from requesting the first timed batch to receiving the last."""
  batches = iter(loader)
  for _ in range(args.warmup_batches):
    next_checked(batches, args.batch_size, args.image_size)
  start = time.perf_counter()
  for _ in range(args.batches):
    next_checked(batches, args.batch_size, args.image_size)
  return time.perf_counter() - start


def main():
  args = parse_args()
  shards = [path for pattern in args.shards for path in braceexpand.braceexpand(pattern)]
  if len(shards) < args.workers:
    raise SystemExit(f'{len(shards)} shards for {args.workers} workers: open_clip needs '
                     'at least one shard per worker')
  set_threads(args.torch_threads)
  per_worker = math.ceil((args.warmup_batches + args.batches) / max(1, args.workers))
  dataset = build_dataset(shards, args.batch_size, args.image_size, per_worker)
  loader = build_loader(dataset, args.workers, args.torch_threads)
  with WorkerRssSampler() as rss:
    seconds = time_batches(loader, args)
  images_per_s = args.batches * args.batch_size / seconds
  print(json.dumps({
      'impl': 'open_clip_webdataset', 'workers': args.workers, 'batch_size': args.batch_size,
      'image_size': args.image_size, 'batches': args.batches,
      'images': args.batches * args.batch_size, 'seconds': round(seconds, 4),
      'images_per_s': round(images_per_s, 2),
      'images_per_s_per_worker': round(images_per_s / max(1, args.workers), 2),
      'peak_rss_mib_main': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'peak_rss_mib_workers_sum': round(rss.peak_bytes / 2**20, 1),
      'torch': torch.__version__, 'torchvision': torchvision.__version__,
      'open_clip': open_clip.__version__, 'webdataset': wds.__version__,
  }))


if __name__ == '__main__':
  main()
