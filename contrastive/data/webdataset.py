"""Web-scale image-text pairs from webdataset tar shards (img2dataset's output):
`config.dataset.name = 'webdataset'` for the two-tower recipes.

  config.dataset = dict(
      name='webdataset',
      train_shards='/data/cc3m/{00000..00331}.tar',  # brace pattern, glob, list, file of paths
      eval_shards='/data/cc3m/val/{00000..00003}.tar',
      image_keys='jpg;jpeg;png;webp',  # the first extension present is the sample's image
      text_key='txt', group_key='',    # group_key: a JSON field; equal values: false negatives
      index_dir='',                    # '' : each index beside its shard (else ~/.cache)
      image_size=224, crop_scale=(0.9, 1.0),  # training: random resized crop (image_decode.py)
      worker_count=-1,                 # grain worker processes; -1: the host's cores - 1
      max_skipped_fraction=0.01,       # more skipped samples than this is an error
      tokenizer_sample=100_000,        # captions the tokenizer is trained on (a seeded sample)
      class_names='', label_key='')    # zero-shot: class names (or a file of them) and the
                                       # JSON field with each eval sample's class (index/name)

Every sample of the shards has a global index (shard order, then tar order); grain's shuffle,
per-process slicing and the checkpointed iterator state work on it as on any other source
(`webdataset_loader.py`). A sample that cannot be used (`shard_index.REASONS`: no image or
text, an empty caption, a truncated member, an image that does not decode) is replaced by the
next usable sample of its shard (cyclically; then the next shards'), and flagged: the flag is
counted in the train state (`skipped_samples` in the metrics). The replacement is a function
of the data alone, so a resumed run reads the same batches.
"""

import json
import os
import tarfile

import jax
import numpy as np

from contrastive.config_lib import ConfigError
from contrastive.data import image_decode
from contrastive.data import shard_index
from contrastive.data import pair_batches

DEFAULTS = dict(name='webdataset', data_dir='', train_shards='', eval_shards='',
                image_keys='jpg;jpeg;png;webp', text_key='txt', group_key='', index_dir='',
                image_size=224, crop_scale=(0.9, 1.0), worker_count=-1,
                max_skipped_fraction=0.01, tokenizer_sample=100_000, class_names='',
                label_key='')
SPEC = pair_batches.SPECS['webdataset']
_SCAN_LIMIT = 1 << 16  # samples tried after a bad one before giving up (all bad: an error)


def settings(dataset_cfg):
  """config.dataset with its defaults; ConfigError naming an unknown or invalid field."""
  cfg = dict(DEFAULTS, **dataset_cfg.to_dict())
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ConfigError(f'config.dataset: unknown field(s) {sorted(unknown)} for webdataset; '
                      f'known: {sorted(DEFAULTS)}.')
  lo, hi = (float(x) for x in cfg['crop_scale'])
  if not 0 < lo <= hi <= 1:
    raise ConfigError(f'config.dataset.crop_scale={cfg["crop_scale"]}: need 0 < min <= max '
                      '<= 1 (area fractions of the image).')
  if not 0 <= float(cfg['max_skipped_fraction']) < 1:
    raise ConfigError(f'config.dataset.max_skipped_fraction={cfg["max_skipped_fraction"]}: '
                      'need 0 <= fraction < 1.')
  if int(cfg['image_size']) < 1 or int(cfg['tokenizer_sample']) < 1:
    raise ConfigError('config.dataset.image_size and tokenizer_sample must be >= 1.')
  cfg['image_keys'] = [k.strip().lower() for k in str(cfg['image_keys']).split(';') if k.strip()]
  if not cfg['image_keys']:
    raise ConfigError('config.dataset.image_keys is empty; e.g. \'jpg;jpeg;png;webp\'.')
  return cfg


def worker_count(cfg):
  """config.dataset.worker_count, -1 resolved to the host's cores minus one."""
  count = int(cfg['worker_count'])
  return max(0, (os.cpu_count() or 1) - 1) if count < 0 else count


def class_names(cfg):
  """The zero-shot class names: config.dataset.class_names as a list, or the lines of the file
  it names ([] when not given)."""
  names = cfg['class_names']
  if isinstance(names, str):
    if not names:
      return []
    if not os.path.isfile(names):
      raise ConfigError(f'config.dataset.class_names={names!r}: give a tuple of names or a '
                        'file of them, one per line.')
    with open(names, encoding='utf-8') as f:
      return [line.strip() for line in f if line.strip()]
  return [str(n) for n in names]


class Shards:
  """The samples of a list of shards by global index. Picklable: each process (grain worker)
  opens the files and memory-maps the indexes itself, on first use."""

  def __init__(self, paths, cfg):
    self.paths = list(paths)
    self._options = (cfg['image_keys'], cfg['text_key'], cfg['group_key'], cfg['index_dir'])
    metas = index_all(self.paths, self._options)
    self.counts = np.array([m['num_samples'] for m in metas], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])
    self.status_counts = np.array([m['status_counts'] for m in metas], np.int64)  # [shards, R]
    self._records, self._files, self._keys = {}, {}, {}

  def __len__(self):
    return int(self.starts[-1])

  def __getstate__(self):
    return dict(self.__dict__, _records={}, _files={}, _keys={})

  def locate(self, index):
    """Global sample index -> (shard, index within the shard)."""
    shard = int(np.searchsorted(self.starts, index, side='right')) - 1
    return shard, int(index - self.starts[shard])

  def records(self, shard):
    if shard not in self._records:
      self._records[shard] = shard_index.load(self.paths[shard], *self._options)[0]
    return self._records[shard]

  def shard_keys(self, shard):
    """The KEYs of a shard's samples, in order."""
    if shard not in self._keys:
      self._keys[shard] = shard_index.load(self.paths[shard], *self._options)[1]['keys']
    return self._keys[shard]

  def key(self, index):
    """The sample's KEY (for messages)."""
    shard, local = self.locate(index)
    return self.shard_keys(shard)[local]

  def read(self, shard, offset, size):
    if shard not in self._files:
      self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
    return os.pread(self._files[shard], int(size), int(offset))

  def sample(self, index):
    """(image bytes, caption str, group id, status) of a sample."""
    shard, local = self.locate(index)
    r = self.records(shard)[local]
    if int(r['status']) != shard_index.OK:
      return None, None, int(r['group']), int(r['status'])
    caption = self.read(shard, r['text_offset'], r['text_size']).decode('utf-8', 'replace')
    return (self.read(shard, r['image_offset'], r['image_size']), caption.strip(),
            int(r['group']), shard_index.OK)

  def next_index(self, index):
    """The sample after `index` in its shard, cyclically; past the shard's samples, the next
    shard's (the order replacements are tried in)."""
    shard, local = self.locate(index)
    if local + 1 < self.counts[shard]:
      return index + 1
    return int(self.starts[(shard + 1) % len(self.paths)])

  def bad_fraction(self):
    """Share of the samples the index already knows to be unusable."""
    return float(self.status_counts[:, 1:].sum() / max(1, len(self)))

  def worst(self, per_shard, num=3):
    """'path (count), ...' of the shards with the most skips ([shards] counts)."""
    order = np.argsort(-np.asarray(per_shard), kind='stable')[:num]
    return ', '.join(f'{self.paths[i]} ({int(per_shard[i])})' for i in order if per_shard[i])


def index_all(paths, options):
  """The shards' index records (`shard_index.load` meta), built where missing: each process
  first builds its share (shards p, p + P, ...: a shared cache folder is then built once),
  then whatever its own cache still lacks."""
  count, me = jax.process_count(), jax.process_index()
  for path in paths[me::count]:
    shard_index.load(path, *options)
  if count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('webdataset_index')
  return [shard_index.load(path, *options)[1] for path in paths]


def usable(shards, index, decode):
  """(value, index used, status of `index`): decode(image bytes, caption, group, used index)
  of the first usable sample from `index` on (`Shards.next_index`); raises DecodeError from
  `decode` to move on. Raises RuntimeError if none of _SCAN_LIMIT samples is usable."""
  first_status, current = None, int(index)
  for _ in range(min(_SCAN_LIMIT, len(shards))):
    image, caption, group, status = shards.sample(current)
    if status == shard_index.OK:
      try:
        value = decode(image, caption, group, current)
        return value, current, first_status or shard_index.OK
      except image_decode.DecodeError:
        status = shard_index.BAD_IMAGE
    first_status = first_status or status
    current = shards.next_index(current)
  raise RuntimeError(f'no usable sample among {min(_SCAN_LIMIT, len(shards))} from sample '
                     f'{index} of {shards.paths[shards.locate(index)[0]]}.')


class CaptionSample:
  """A seeded sample of the training captions (what the tokenizer is trained on): a source of
  {'text': bytes} records (`pair_batches.load_or_train_tokenizer` reads it whole)."""

  def __init__(self, shards, size, seed):
    n = min(len(shards), int(size))
    self._shards = shards
    self._indices = np.sort(np.random.default_rng([int(seed), 7]).choice(len(shards), n,
                                                                         replace=False))

  def __len__(self):
    return len(self._indices)

  def __getitems__(self, indices):
    out = []
    for i in indices:
      caption = self._shards.sample(int(self._indices[int(i)]))[1]  # None: unusable
      out.append({'text': (caption or '').encode('utf-8')})
    return out


class EvalSamples:
  """The eval shards' usable samples, centre-cropped, as records {'image', 'text', 'id',
  'label'} (`pair_batches.eval_pairs` reads them whole); unusable samples are left out."""

  def __init__(self, shards, cfg):
    names = class_names(cfg)
    name_index = {n: i for i, n in enumerate(names)}
    self.records, self.skipped, labels = [], 0, {}
    for index in range(len(shards)):
      image, caption, group, status = shards.sample(index)
      try:
        if status != shard_index.OK:
          raise image_decode.DecodeError(shard_index.REASONS[status])
        pixels = image_decode.crop(image, int(cfg['image_size']))
      except image_decode.DecodeError:
        self.skipped += 1
        continue
      record = {'image': pixels, 'text': caption.encode('utf-8'), 'id': np.int32(group),
                'label': np.int32(-1)}
      if names and cfg['label_key']:
        shard = shards.locate(index)[0]
        if shard not in labels:
          labels[shard] = _labels(shards.paths[shard], cfg['label_key'], name_index)
        record['label'] = np.int32(labels[shard].get(shards.key(index), -1))
      self.records.append(record)
    if not self.records:
      raise ConfigError(f'config.dataset.eval_shards: no usable sample in {shards.paths}.')

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[int(i)] for i in indices]


def _labels(path, label_key, name_index):
  """{sample KEY: class} of one eval shard from its JSON members' `label_key` (a class index
  or name); samples without one are absent (label -1)."""
  labels = {}
  with tarfile.open(path, mode='r:') as tar:
    for member in tar:
      if not (member.isfile() and member.name.endswith('.json')):
        continue
      try:
        value = json.load(tar.extractfile(member)).get(label_key)
      except (ValueError, AttributeError, tarfile.TarError):
        continue
      label = name_index.get(value, -1) if isinstance(value, str) else (
          int(value) if isinstance(value, int) and 0 <= value < len(name_index) else -1)
      labels[member.name[:-len('.json')]] = label
  return labels
