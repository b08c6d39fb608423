"""Pair datasets for two-tower (CLIP / SigLIP / LiT) training: the hash split and first-use preparation
shared by the pair builders (`emoji.EmojiCldr`, `wordnet.WordnetGloss`), and `JsonlPairs`, which
converts a JSON-lines file of pairs into array_record shards read like any other tfds source.

A JSON-lines file holds one record per line, all of one kind:

    {"image": "imgs/cat.png", "text": "a photo of a cat"}        # kind 'image_text'
    {"text_a": "dog", "text_b": "a domesticated canid"}          # kind 'text_text'

Image paths are absolute or relative to the .jsonl file's folder; any Pillow format is read, made RGB
(transparency over white), centre-cropped to a square and resized to `image_size`. An optional
"split" key names the record's split (default 'train'). Convert once, then read with random access:

    builder = convert_jsonl('pairs.jsonl', data_dir=tmp, image_size=64, num_shards=4)
    train = builder.as_data_source(split='train')
    train[i] -> {'image': [64, 64, 3] uint8, 'text': bytes, 'id': int32}   # 'id': the line index
                {'text_a': bytes, 'text_b': bytes, 'id': int32}            # kind 'text_text'

A builder keeps one converted file per (kind, image size) in its data_dir: convert different files
into different data_dirs (`load_split` raises if the data_dir holds another file's conversion).
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from contrastive.data.fashion_mnist import MissingDatasetError

KINDS = {'image_text': ('image', 'text'), 'text_text': ('text_a', 'text_b')}


def in_test_split(key, test_fraction):
  """Deterministic hash split: True for about `test_fraction` of keys, the same on every run and
  machine (SHA-256 of the UTF-8 key, not Python's salted `hash`)."""
  digest = hashlib.sha256(key.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') < test_fraction * 2.0**64


def prepare(builder, **prepare_kwargs):
  """Converts `builder`'s dataset to array_record on first use (a no-op afterwards); raises if its
  data_dir holds a conversion of another source file. Single-process: a multi-process job prepares on
  process 0 first (`pipeline.get_source`)."""
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record', **prepare_kwargs)
  expected = getattr(builder, 'source_path', None)
  found = builder.info.metadata.get('source') if builder.info.metadata else None
  if expected and found and found != expected:
    raise ValueError(f'{builder.data_dir!r} holds a conversion of {found!r}, not {expected!r}: '
                     'use another data_dir.')
  return builder


def load_split(builder, split):
  """`split`'s random-access source (`source[i]` -> dict of numpy values, strings as bytes),
  converting the dataset on first use."""
  return prepare(builder).as_data_source(split=split)


def read_jsonl(path, kind=None):
  """Reads and checks the records. Returns (kind, [(line index, split, first, second)])."""
  if not os.path.isfile(path):
    raise MissingDatasetError(f'JSON-lines file {path!r} not found.')
  rows = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n + 1}: not JSON ({e}).') from None
      kind = kind or next((k for k, keys in KINDS.items() if set(keys) <= set(record)), None)
      if kind not in KINDS or not set(KINDS[kind]) <= set(record):
        raise ValueError(f'{path}:{n + 1}: expected keys {KINDS.get(kind) or list(KINDS.values())}'
                         f', found {sorted(record)}.')
      first, second = (record[k] for k in KINDS[kind])
      rows.append((n, str(record.get('split', 'train')), first, second))
  if not rows:
    raise ValueError(f'{path!r} holds no records.')
  return kind, rows


def load_image(path, size):
  """Image file -> [size, size, 3] uint8: RGB over white, centre square crop, Lanczos resize."""
  with Image.open(path) as im:
    im = im.convert('RGBA')
  rgb = Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im).convert('RGB')
  side = min(rgb.size)
  left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
  square = rgb.crop((left, top, left + side, top + side))
  return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), np.uint8)


@dataclasses.dataclass
class JsonlPairsConfig(tfds.core.BuilderConfig):
  """kind: 'image_text' or 'text_text'; image_size: S of the [S, S, 3] images (image_text only)."""
  kind: str = 'image_text'
  image_size: int = 64


class JsonlPairs(tfds.core.GeneratorBasedBuilder):
  """Pairs from a JSON-lines file (see the module docstring). The file is `jsonl_path`, or else the
  `pairs.jsonl` in DownloadConfig(manual_dir=...) (how `pipeline.get_source` passes a folder)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Converted from a JSON-lines file.'}
  BUILDER_CONFIGS = [JsonlPairsConfig(name=f'image_text_{s}px', image_size=s) for s in (64, 32)] + [
      JsonlPairsConfig(name='text_text', kind='text_text')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put pairs.jsonl (and its images) in the manual_dir.'

  def __init__(self, *, jsonl_path=None, kind=None, image_size=64, **kwargs):
    if kind is None and kwargs.get('config') is None and jsonl_path:
      kind = read_jsonl(jsonl_path)[0]
    if kind is not None:
      name = 'text_text' if kind == 'text_text' else f'image_text_{image_size}px'
      kwargs['config'] = self.builder_configs.get(name) or JsonlPairsConfig(
          name=name, kind=kind, image_size=image_size)
    self.source_path = os.path.abspath(jsonl_path) if jsonl_path else None
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)
    self._original_state.update(jsonl_path=jsonl_path, file_format=kwargs['file_format'])

  def _info(self):
    cfg = self.builder_config
    if cfg.kind == 'image_text':
      size = cfg.image_size
      pair = {'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='zlib'),
              'text': tfds.features.Text()}
    else:
      pair = {'text_a': tfds.features.Text(), 'text_b': tfds.features.Text()}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({**pair, 'id': tfds.features.Scalar(dtype=np.int32)}),
        metadata=tfds.core.MetadataDict())

  def download_and_prepare(self, *args, **kwargs):
    if not self.is_prepared() and self.source_path and not os.path.isfile(self.source_path):
      raise MissingDatasetError(f'JSON-lines file {self.source_path!r} not found.')
    return super().download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager):
    if self.source_path is None:
      manual = os.fspath(dl_manager.manual_dir)
      self.source_path = os.path.abspath(
          manual if os.path.isfile(manual) else os.path.join(manual, 'pairs.jsonl'))
    cfg = self.builder_config
    _, rows = read_jsonl(self.source_path, cfg.kind)
    self.info.metadata.update(source=self.source_path, num_records=len(rows))
    root = os.path.dirname(self.source_path)
    splits = sorted({split for _, split, _, _ in rows})
    return {s: self._generate_examples([r for r in rows if r[1] == s], root) for s in splits}

  def _generate_examples(self, rows, root):
    a, b = KINDS[self.builder_config.kind]
    for n, _, first, second in rows:
      if a == 'image':
        path = os.path.join(root, first)
        if not os.path.isfile(path):
          raise FileNotFoundError(f'{self.source_path}:{n + 1}: image {path!r} not found.')
        first = load_image(path, self.builder_config.image_size)
      yield n, {a: first, b: second, 'id': n}


def convert_jsonl(jsonl_path, data_dir, *, kind=None, image_size=64, num_shards=None):
  """Converts `jsonl_path` into array_record shards under `data_dir` (once) and returns the builder;
  `builder.as_data_source(split)` then reads it. kind=None reads it from the first record."""
  builder = JsonlPairs(jsonl_path=jsonl_path, kind=kind, image_size=image_size, data_dir=data_dir)
  return prepare(builder, download_config=tfds.download.DownloadConfig(num_shards=num_shards))
