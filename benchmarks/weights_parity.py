r"""A full-size open_clip CLIP through `python -m contrastive.weights import`: parity of the
embeddings and encode_image throughput against open_clip's, on this CPU.

  python benchmarks/weights_parity.py --torch_python=/tmp/openclipenv/bin/python \
      >> benchmarks/results/weights_parity.jsonl

The torch side (this file run by the torch environment's Python, `--side=torch`) builds
open_clip's `--arch` with its random initialisation, saves the state dict as .safetensors,
embeds raw uint8 images of several sizes through open_clip's eval `preprocess` and texts
through its tokenizer, and times `encode_image` on a batch of preprocessed images
(torch.set_num_threads(cores), no grad). This side imports the checkpoint into a workdir,
embeds the same raw images and strings with `inference.load`, and times the image tower's
jitted forward on the same batch size. Each prints one JSON line: max |diff| and the lowest
cosine of the normalised embeddings, token ids equal, median seconds and images/s.

Torch and open_clip are not project dependencies (benchmarks/openclip_pipeline.py says how
their environment is made).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TEXTS = ['a photo of a cat', 'two dogs playing in the snow', 'A red car, parked.',
         'an emoji of a grinning face with big eyes']


def raw_images(seed=0):
  """Four uint8 images of different sizes with smooth content and noise."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in ((224, 224), (300, 400), (480, 360), (150, 260)):
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + (y[..., None] * rng.uniform(-1, 1, 3) +
                                     x[..., None] * rng.uniform(-1, 1, 3))
    out.append(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def _median_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def torch_side(args):
  """Runs in the torch environment: writes model.safetensors and reference.npz to --out."""
  import open_clip  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  model, _, preprocess = open_clip.create_model_and_transforms(args.arch, pretrained=None)
  model.eval()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(args.out, 'model.safetensors'))
  tokens = open_clip.get_tokenizer(args.arch)(TEXTS)
  with torch.no_grad():
    pixels = torch.stack([preprocess(Image.fromarray(x)) for x in raw_images()])
    image = model.encode_image(pixels).numpy()
    text = model.encode_text(tokens).numpy()
    batch = pixels[:1].repeat(args.batch_size, 1, 1, 1)
    seconds = _median_seconds(lambda: model.encode_image(batch), args.repeats)
  np.savez(os.path.join(args.out, 'reference.npz'), image=image, text=text,
           tokens=tokens.numpy())
  print(json.dumps(dict(impl='open_clip', arch=args.arch, batch_size=args.batch_size,
                        seconds=seconds, images_per_s=args.batch_size / seconds,
                        torch=torch.__version__, open_clip=open_clip.__version__)))


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def ours(args, folder):
  """Imports the torch side's checkpoint and compares; one JSON line."""
  from contrastive import inference  # pylint: disable=g-import-not-at-top
  from contrastive.recipes.two_tower_model import short_side_crop  # pylint: disable=g-import-not-at-top
  from contrastive.weights import importer  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(folder, 'workdir')
  importer.import_checkpoint('open_clip', args.arch, os.path.join(folder, 'model.safetensors'),
                             None, workdir)
  ref = np.load(os.path.join(folder, 'reference.npz'))
  model = inference.load(workdir)
  image, text = model.encode_image(raw_images()), model.encode_text(TEXTS)
  one = short_side_crop(raw_images()[0], model.image_size)  # as the torch side's batch
  batch = np.repeat(one[None], args.batch_size, 0)
  encode = lambda: model._batched('encode_a', batch, args.batch_size)  # pylint: disable=protected-access
  seconds = _median_seconds(encode, args.repeats)
  return dict(impl='ours', arch=args.arch, batch_size=args.batch_size, seconds=seconds,
              images_per_s=args.batch_size / seconds,
              tokens_equal=bool(np.array_equal(model.tokenize(TEXTS), ref['tokens'])),
              image_max_abs_diff=float(np.abs(image - _unit(ref['image'])).max()),
              image_min_cosine=float(np.min(np.sum(image * _unit(ref['image']), 1))),
              text_max_abs_diff=float(np.abs(text - _unit(ref['text'])).max()),
              text_min_cosine=float(np.min(np.sum(text * _unit(ref['text']), 1))))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', default='ViT-B-32')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--torch_python', default='')
  p.add_argument('--side', default='ours', help=argparse.SUPPRESS)
  p.add_argument('--out', default='', help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.side == 'torch':
    torch_side(args)
    return
  with tempfile.TemporaryDirectory() as folder:
    out = subprocess.run([args.torch_python, os.path.abspath(__file__), '--side=torch',
                          f'--out={folder}', f'--arch={args.arch}',
                          f'--batch_size={args.batch_size}', f'--repeats={args.repeats}'],
                         capture_output=True, text=True, check=False)
    if out.returncode:
      sys.exit(f'torch side failed: {out.stderr[-2000:]}')
    torch_line = json.loads(out.stdout.strip().splitlines()[-1])
    line = ours(args, folder)
    line['ratio_vs_open_clip'] = line['images_per_s'] / torch_line['images_per_s']
    print(json.dumps(torch_line))
    print(json.dumps(line))


if __name__ == '__main__':
  main()
