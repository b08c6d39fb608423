"""Generated webdataset shards for the tests: real JPEG, PNG and WEBP bytes and every kind of
bad sample the loader must skip (tests/test_webdataset*.py)."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import simplejpeg


def picture(seed, height=48, width=64):
  """A smooth random RGB image (colour gradients + noise): compresses like a photo."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = rng.uniform(0, 255, 3) + rng.uniform(-2, 2, 3) * y[..., None] + rng.uniform(
      -2, 2, 3) * x[..., None]
  return np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(image, fmt):
  if fmt == 'jpg':
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=90, colorspace='RGB')
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format={'png': 'PNG', 'webp': 'WEBP'}[fmt])
  return buf.getvalue()


def write_shard(path, samples, *, truncate_last=0):
  """samples: [(key, {ext: bytes})] in order; truncate_last > 0 cuts the archive inside its
  last member's data (a copy killed halfway)."""
  with tarfile.open(path, 'w', format=tarfile.PAX_FORMAT) as tar:
    for key, files in samples:
      for ext, data in files.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size, info.mtime = len(data), 1_700_000_000
        tar.addfile(info, io.BytesIO(data))
  if truncate_last:  # the file ends `truncate_last` bytes before its last member's data does
    with tarfile.open(path) as tar:
      last = tar.getmembers()[-1]
    with open(path, 'r+b') as f:
      f.truncate(last.offset_data + last.size - truncate_last)


def good(key, seed, fmt='jpg', caption=None, group=None, **image_kwargs):
  meta = {'key': key, 'label': ('red', 'green', 'blue')[seed % 3]}  # zero-shot's class
  if group is not None:
    meta['group'] = group
  return key, {fmt: encode(picture(seed, **image_kwargs), fmt),
               'txt': (caption or f'picture number {seed}').encode('utf-8'),
               'json': json.dumps(meta).encode()}


def clean_shards(folder, num_shards=4, per_shard=40, seed=0, **image_kwargs):
  """`num_shards` shards of `per_shard` good JPEG samples; returns their paths."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s in range(num_shards):
    path = os.path.join(folder, f'{s:05d}.tar')
    write_shard(path, [good(f'{s:05d}{i:04d}', seed + 1000 * s + i, **image_kwargs)
                       for i in range(per_shard)])
    paths.append(path)
  return paths


def messy_shard(path):
  """One shard with a sample of every kind; returns {key: expected status name}."""
  corrupt = bytearray(encode(picture(7), 'jpg'))
  corrupt[200:260] = b'\x00' * 60  # entropy-coded data destroyed
  samples = [
      good('a0', 1), good('a1', 2, 'png'), good('a2', 3, 'webp'),
      ('no_image', {'txt': b'a caption without a picture'}),
      ('no_text', {'jpg': encode(picture(4), 'jpg')}),
      ('empty_caption', {'jpg': encode(picture(5), 'jpg'), 'txt': b'  \n'}),
      ('corrupt', {'jpg': bytes(corrupt[:len(corrupt) // 3]), 'txt': b'cut short'}),
      ('garbage', {'jpg': b'\xff\xd8\xff' + b'not a jpeg' * 20, 'txt': b'garbage bytes'}),
      good('caf\u00e9_\u732b', 8, caption='un caf\u00e9 et un \u732b'),
      ('both', {'png': encode(picture(9), 'png'), 'jpg': encode(picture(10), 'jpg'),
                'txt': b'two images'}),
      good('last', 11, width=400, height=300),
  ]
  write_shard(path, samples, truncate_last=1000)
  return {'a0': 'ok', 'a1': 'ok', 'a2': 'ok', 'no_image': 'no image member',
          'no_text': 'no text member', 'empty_caption': 'empty caption', 'corrupt': 'ok',
          'garbage': 'ok', 'caf\u00e9_\u732b': 'ok', 'both': 'ok', 'last': 'truncated member'}
