r"""Webdataset shards from the command line: index them, or write them (img2dataset's layout).

  python -m contrastive.data.shards index '/data/cc3m/{00000..00331}.tar'
      builds (or reads) each shard's index, counts samples and reports the unusable ones;
      --verify also decodes every image (what training would skip when it reads them).
  python -m contrastive.data.shards write --from jsonl pairs.jsonl --out /data/mine
      a JSON-lines file of {"image": path, "text": caption, ...} (contrastive/data/pairs.py)
  python -m contrastive.data.shards write --from tfds emoji_cldr --split train --out /data/e
      a tfds dataset with an image and a text feature ('emoji_cldr': this codebase's
      offline emoji renders; --resize 512 --texture makes them photo-sized JPEGs whose decode
      costs what a photo's does, for tests and benchmarks)

A written shard NNNNN.tar holds --per_shard samples KEY.jpg (quality --quality), KEY.txt
(the caption) and KEY.json ({"key", "caption"} and the record's other scalar fields, e.g.
emoji's "image_id" and "group": --config.dataset.group_key=image_id). Keys are NNNNNIIII as
img2dataset writes them.
"""

import argparse
import io
import json
import os
import sys
import tarfile
import time

import numpy as np
from PIL import Image
import simplejpeg

from contrastive.data import image_decode
from contrastive.data import shard_index


def _member(tar, name, data, mtime):
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), mtime, 0o644
  tar.addfile(info, io.BytesIO(data))


def _texture(image, size, rng):
  """`image` resized to size x size (bicubic) with seeded fine noise: detail for the JPEG
  coder, so that decoding it costs what a photo of that size costs."""
  big = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC),
                   np.int16)
  noise = rng.integers(-24, 25, (size, size, 1), np.int16)
  return np.clip(big + noise, 0, 255).astype(np.uint8)


def write(records, out_dir, *, per_shard=1000, quality=90, resize=0, texture=False, seed=0):
  """Writes `records` (iterable of (image [H, W, 3] uint8 or encoded bytes, caption, {json
  fields})) as shards out_dir/00000.tar, ... Returns the shard paths."""
  os.makedirs(out_dir, exist_ok=True)
  rng, paths, tar, mtime = np.random.default_rng(seed), [], None, int(time.time())
  for n, (image, caption, fields) in enumerate(records):
    shard, i = divmod(n, per_shard)
    if i == 0:
      if tar:
        tar.close()
      paths.append(os.path.join(out_dir, f'{shard:05d}.tar'))
      tar = tarfile.open(paths[-1], 'w', format=tarfile.PAX_FORMAT)
    key = f'{shard:05d}{i:04d}'
    if not isinstance(image, bytes):
      image = np.ascontiguousarray(image, np.uint8)
      if resize:
        image = _texture(image, resize, rng) if texture else np.asarray(
            Image.fromarray(image).resize((resize, resize), Image.Resampling.BICUBIC))
      image = simplejpeg.encode_jpeg(image, quality=quality, colorspace='RGB')
    _member(tar, key + '.jpg', image, mtime)
    _member(tar, key + '.txt', caption.encode('utf-8'), mtime)
    _member(tar, key + '.json', json.dumps(dict(fields, key=key, caption=caption)).encode(),
            mtime)
  if tar:
    tar.close()
  return paths


def jsonl_records(path):
  """(image bytes, caption, fields) of a JSON-lines file of image-text pairs (pairs.py)."""
  from contrastive.data import pairs  # pylint: disable=g-import-not-at-top
  kind, rows = pairs.read_jsonl(path)
  if kind != 'image_text':
    raise ValueError(f'{path}: shards hold image-text pairs; this file is {kind}.')
  root = os.path.dirname(os.path.abspath(path))
  for n, split, image, text in rows:
    with open(os.path.join(root, image), 'rb') as f:
      data = f.read()
    if not data.startswith(b'\xff\xd8'):  # not a JPEG: re-encode (transparency over white)
      data = simplejpeg.encode_jpeg(np.ascontiguousarray(image_decode._pillow(data)), quality=95)  # pylint: disable=protected-access
    yield data, text, {'line': n, 'split': split}


def tfds_records(name, split, data_dir=''):
  """(image, caption, scalar fields) of a tfds dataset (this codebase's local builders
  first: emoji_cldr)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  if name in ('emoji_cldr',):
    import ml_collections  # pylint: disable=g-import-not-at-top
    cfg = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir, image_size=64,
                                         languages=('en',), max_examples=0))
    source = pair_batches.get_source(cfg, split)
  else:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  for n in range(len(source)):
    r = source[n]
    text = r['text'].decode('utf-8') if isinstance(r['text'], bytes) else str(r['text'])
    fields = {k: v.item() for k, v in r.items()
              if k not in ('image', 'text') and np.ndim(v) == 0 and hasattr(v, 'item')}
    yield np.asarray(r['image'], np.uint8), text, fields


def index(pattern, *, image_keys, text_key, group_key='', index_dir='', verify=False):
  """Indexes every shard of `pattern`; returns {'shards', 'samples', reason: count}."""
  totals = dict(shards=0, samples=0)
  for path in shard_index.expand(pattern):
    records, meta = shard_index.load(path, image_keys, text_key, group_key, index_dir)
    status = np.array(records['status'])
    if verify:
      with open(path, 'rb') as f:
        for row in np.flatnonzero(status == shard_index.OK):
          f.seek(int(records['image_offset'][row]))
          try:
            image_decode.crop(f.read(int(records['image_size'][row])), 8)
          except image_decode.DecodeError:
            status[row] = shard_index.BAD_IMAGE
    totals['shards'] += 1
    totals['samples'] += len(status)
    for row in np.flatnonzero(status != shard_index.OK):
      reason = shard_index.REASONS[status[row]]
      totals[reason] = totals.get(reason, 0) + 1
      print(f'{path}: {meta["keys"][row]!r}: {reason}', file=sys.stderr)
  return totals


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('index', help='index shards and report unusable samples')
  p.add_argument('pattern')
  p.add_argument('--image_keys', default='jpg;jpeg;png;webp')
  p.add_argument('--text_key', default='txt')
  p.add_argument('--group_key', default='')
  p.add_argument('--index_dir', default='')
  p.add_argument('--verify', action='store_true', help='also decode every image')
  w = sub.add_parser('write', help='write img2dataset-layout shards')
  w.add_argument('--from', dest='kind', choices=('jsonl', 'tfds'), required=True)
  w.add_argument('source', help='a .jsonl file, or a tfds dataset name')
  w.add_argument('--out', required=True)
  w.add_argument('--split', default='train')
  w.add_argument('--data_dir', default='')
  w.add_argument('--per_shard', type=int, default=1000)
  w.add_argument('--quality', type=int, default=90)
  w.add_argument('--resize', type=int, default=0, help='> 0: images resized to this square')
  w.add_argument('--texture', action='store_true', help='with --resize: add fine noise')
  args = parser.parse_args(argv)
  if args.command == 'index':
    keys = [k for k in args.image_keys.split(';') if k]
    print(json.dumps(index(args.pattern, image_keys=keys, text_key=args.text_key,
                           group_key=args.group_key, index_dir=args.index_dir,
                           verify=args.verify)))
    return
  records = (jsonl_records(args.source) if args.kind == 'jsonl' else
             tfds_records(args.source, args.split, args.data_dir))
  paths = write(records, args.out, per_shard=args.per_shard, quality=args.quality,
                resize=args.resize, texture=args.texture)
  print(json.dumps({'shards': len(paths), 'first': paths[0] if paths else None,
                    'last': paths[-1] if paths else None}))


if __name__ == '__main__':
  main()
