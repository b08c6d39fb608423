"""Pair datasets for two-tower (CLIP / SigLIP / LiT) training: the hash split and first-use preparation
shared by the pair builders (`emoji.EmojiCldr`, `wordnet.WordnetGloss`), and `JsonlPairs`, which
converts a JSON-lines file of pairs into array_record shards read like any other tfds source.

A JSON-lines file holds one record per line, all of one kind (contrastive/data/jsonl_records.py
reads and checks it: each bad record is a `PairsDataError` naming FILE:LINE):

    {"image": "imgs/cat.png", "text": "a photo of a cat"}        # kind 'image_text'
    {"text_a": "dog", "text_b": "a domesticated canid"}          # kind 'text_text'

Image paths are absolute or relative to the .jsonl file's folder; any Pillow format is read, made RGB
(transparency over white), centre-cropped to a square and resized to `image_size`. An optional
"split" key names the record's split (records without one are 'train'); where no record has one,
`test_fraction` (0.1) of them are 'test' by a hash of the image path or text a. Records of one image
(or text a) share a group id, the first one's line index. Convert once, then read with random
access:

    builder = convert_jsonl('pairs.jsonl', data_dir=tmp, image_size=64, num_shards=4)
    train = builder.as_data_source(split='train')
    train[i] -> {'image': [64, 64, 3] uint8, 'text': bytes, 'id': int32}   # 'id': the group id
                {'text_a': bytes, 'text_b': bytes, 'id': int32}            # kind 'text_text'

The conversion records its source (`jsonl_records.fingerprint`: the file's size, mtime and SHA-256,
its images' sizes and mtimes) as source.json beside the shards: an edited file is converted again
(and the tokenizer cached there dropped). A builder keeps one converted file per (kind, image size)
in its data_dir: convert different files into different data_dirs (`prepare` raises if the
data_dir holds another file's conversion).
"""

import contextlib
import dataclasses
import io
import logging
import os
import shutil

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from contrastive.data import freshness
from contrastive.data import jsonl_records
from contrastive.data.fashion_mnist import MissingDatasetError

KINDS = jsonl_records.KINDS
PairsDataError = jsonl_records.PairsDataError
in_test_split = jsonl_records.in_test_split


@contextlib.contextmanager
def quiet():
  """Silences tfds while it builds or converts a local dataset: its absl warnings (custom
  configs, variant folders without dataset_info.json), the "Downloading and preparing dataset
  Unknown size" lines it prints and its progress bars. Callers print one line of their own."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  progress = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
  absl_logger.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)
    tfds.display_progress_bar(progress)


def is_prepared(builder):
  """builder.is_prepared(), without tfds' warning about a variant folder that has no
  dataset_info.json yet (tfds creates the folder before it converts)."""
  with quiet():
    return builder.is_prepared()


def _check_same_file(builder):
  """Raises PairsDataError if `builder`'s data_dir holds a conversion of another file."""
  expected = getattr(builder, 'source_path', None)
  found = builder.info.metadata.get('source') if builder.info.metadata else None
  if expected and found and found != expected:
    raise PairsDataError(f'{builder.data_dir!r} holds a conversion of {found!r}, not {expected!r}: '
                         'use another data_dir (config.dataset.data_dir).')


def is_current(builder):
  """Whether `builder` is converted from its source as it is now (PairsDataError if its
  data_dir holds another file's conversion)."""
  if not is_prepared(builder):
    return False
  _check_same_file(builder)
  source = builder.source_fingerprint() if hasattr(builder, 'source_fingerprint') else None
  return source is None or jsonl_records.same_source(freshness.recorded(builder.data_dir), source)


def _unwrapped(error):
  """The PairsDataError that tfds may have wrapped `error` around, or None."""
  while error is not None:
    if isinstance(error, PairsDataError):
      return error
    error = error.__cause__ or error.__context__
  return None


def prepare(builder, **prepare_kwargs):
  """Converts `builder`'s dataset to array_record on first use, and again (a new builder) when
  its source changed; returns the builder to read. Raises if its data_dir holds a conversion of
  another source file. Single-process: a multi-process job prepares on process 0 first
  (`pair_batches.get_source`)."""
  if is_current(builder):
    return builder
  source = builder.source_fingerprint() if hasattr(builder, 'source_fingerprint') else None
  again = ''
  if is_prepared(builder):  # converted from another version of its source
    again = f' again: {jsonl_records.describe_change(freshness.recorded(builder.data_dir), source)}'
    shutil.rmtree(builder.data_dir)  # the shards and the tokenizers cached beside them
    with quiet():
      builder = type(builder)(**builder._original_state)  # pylint: disable=protected-access
  describe = getattr(builder, 'describe_source', lambda: builder.name)
  print(f'Converting {describe()} into array_record under {builder.data_dir}{again}', flush=True)
  try:
    with quiet():
      builder.download_and_prepare(file_format='array_record', **prepare_kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise _unwrapped(e) or e from None
  if source is not None:
    freshness.record(builder.data_dir, source)
  return builder


def load_split(builder, split):
  """`split`'s random-access source (`source[i]` -> dict of numpy values, strings as bytes),
  converting the dataset on first use."""
  return prepare(builder).as_data_source(split=split)


def read_jsonl(path, kind=None, test_fraction=jsonl_records.TEST_FRACTION):
  """Reads and checks the records (`jsonl_records.read`). Returns (kind, [(line index, split,
  first, second)])."""
  records = jsonl_records.read(path, kind=kind, test_fraction=test_fraction)
  return records.kind, [(r.line, r.split, r.first, r.second) for r in records.rows]


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

  def __init__(self, *, jsonl_path=None, kind=None, image_size=64,
               test_fraction=jsonl_records.TEST_FRACTION, **kwargs):
    if kind is None and kwargs.get('config') is None and jsonl_path:
      kind = self._read(jsonl_path, None, test_fraction).kind
    if kind is not None:
      name = 'text_text' if kind == 'text_text' else f'image_text_{image_size}px'
      kwargs['config'] = self.builder_configs.get(name) or JsonlPairsConfig(
          name=name, kind=kind, image_size=image_size)
    self.source_path = os.path.abspath(jsonl_path) if jsonl_path else None
    self.test_fraction = test_fraction
    kwargs.setdefault('file_format', 'array_record')
    with quiet():  # tfds warns about every config not in BUILDER_CONFIGS
      super().__init__(**kwargs)
    self._original_state.update(jsonl_path=jsonl_path, file_format=kwargs['file_format'],
                                test_fraction=test_fraction)

  @staticmethod
  def _read(path, kind, test_fraction):
    if path and not os.path.isfile(path):
      raise MissingDatasetError(f'JSON-lines file {path!r} not found.')
    return jsonl_records.read(path, kind=kind, test_fraction=test_fraction)

  def records(self):
    """The checked records of the source file (`jsonl_records.Records`)."""
    return self._read(self.source_path, self.builder_config.kind, self.test_fraction)

  def source_fingerprint(self):
    """What the conversion depends on (`jsonl_records.fingerprint`); None without a path."""
    return jsonl_records.fingerprint(self.records()) if self.source_path else None

  def describe_source(self):
    if not self.source_path:
      return self.name
    return f'{os.path.basename(self.source_path)} ({len(self.records().rows)} records)'

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
    rows = self.records().rows
    self.info.metadata.update(source=self.source_path, num_records=len(rows))
    root = os.path.dirname(self.source_path)
    splits = sorted({r.split for r in rows})
    return {s: self._generate_examples([r for r in rows if r.split == s], root) for s in splits}

  def _generate_examples(self, rows, root):
    a, b = KINDS[self.builder_config.kind]
    for row in rows:
      first = row.first
      if a == 'image':
        path = os.path.join(root, first)
        try:
          first = load_image(path, self.builder_config.image_size)
        except Exception as e:  # pylint: disable=broad-except
          raise PairsDataError(f'{self.source_path}:{row.line + 1}: image {row.first!r} cannot '
                               f'be read ({type(e).__name__}: {e}).') from None
      yield row.line, {a: first, b: row.second, 'id': row.group}


def convert_jsonl(jsonl_path, data_dir, *, kind=None, image_size=64, num_shards=None,
                  test_fraction=jsonl_records.TEST_FRACTION):
  """Converts `jsonl_path` into array_record shards under `data_dir` (once, and again when the
  file changed) and returns the builder; `builder.as_data_source(split)` then reads it.
  kind=None reads it from the first record."""
  builder = JsonlPairs(jsonl_path=jsonl_path, kind=kind, image_size=image_size, data_dir=data_dir,
                       test_fraction=test_fraction)
  return prepare(builder, download_config=tfds.download.DownloadConfig(num_shards=num_shards))
