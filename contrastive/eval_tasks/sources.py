"""The evaluation tasks' data, read from what is on disk, streamed in batches of decoded images.

Task names (`parse`):

  zeroshot:imagefolder:DIR   DIR/CLASS/*.{jpg,jpeg,png,webp,bmp}; class names are the folder
                             names, '_' read as a space (sorted as torchvision's ImageFolder)
  zeroshot:NAME              a tfds dataset prepared as array_record in --data_dir (imagenet2012,
                             imagenet_v2, cifar10, cifar100, food101, ...): the standard class
                             names in contrastive/eval_tasks/data/ where the repo has them, else
                             tfds's label names
  zeroshot:wds:PATTERN       webdataset shards (contrastive/data/webdataset.py) whose KEY.json
                             holds 'label' (a class index or name); class names: --classnames
  linear:imagefolder:DIR     a linear probe on the frozen image embeddings: DIR/train/CLASS/*
                             and DIR/test/CLASS/* (or DIR/val/CLASS/*)

--classnames FILE (one per line) names the classes of any zero-shot task; a dataset with
another number of classes is an error.
  retrieval:jsonl:FILE       {"image": path (relative to FILE's folder), "text": caption} lines;
                             an image's captions are its lines (several lines, several captions)
  retrieval:karpathy:FILE    COCO / Flickr30k Karpathy-split JSON ('images' with 'filepath',
                             'filename', 'split', 'sentences'); its 'test' split, images under
                             --data_dir (or FILE's folder)

Every error about the data (unknown task or dataset, a class folder without images, missing
files) is a one-line `EvalDataError`, raised by `parse` before any model work. An image that
does not decode is skipped and counted (`Batches.skipped`).
"""

import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
CLASS_FILES = {'imagenet2012': 'imagenet_classes.txt', 'imagenet_v2': 'imagenet_classes.txt',
               'cifar10': 'cifar10_classes.txt', 'cifar100': 'cifar100_classes.txt'}
SPLITS = {'imagenet2012': 'validation'}  # else 'test'
KINDS = ('zeroshot', 'retrieval', 'linear')


class EvalDataError(ValueError):
  """An evaluation task's data is missing, empty or of the wrong shape."""


def read_lines(path):
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f if line.strip()]


@dataclasses.dataclass
class Task:
  """A parsed task: kind ('zeroshot' | 'retrieval'), dataset name, and its items:
  zero-shot: `images` [(path or tfds index, label)] and `class_names`; retrieval: `images`
  [path] and `captions` [(image index, text)]."""
  kind: str
  name: str
  images: list
  class_names: list = dataclasses.field(default_factory=list)
  captions: list = dataclasses.field(default_factory=list)
  tfds_source: object = None
  shards: object = None  # webdataset.Shards of a 'wds' task
  test: object = None  # a linear probe's test Task


def parse(spec, data_dir='', classnames=''):
  """The Task of a task name (module docstring); EvalDataError if its data is not usable."""
  kind, _, rest = spec.partition(':')
  if kind not in KINDS or not rest:
    raise EvalDataError(f'unknown task {spec!r}: use zeroshot:imagefolder:DIR, zeroshot:NAME, '
                        'zeroshot:wds:PATTERN, retrieval:jsonl:FILE, retrieval:karpathy:FILE or '
                        'linear:imagefolder:DIR.')
  source, _, path = rest.partition(':')
  if kind == 'linear':
    return _linear(spec, source, path)
  if kind == 'zeroshot':
    task = (_image_folder(path) if source == 'imagefolder' else
            _shards(path, classnames) if source == 'wds' else _tfds(rest, data_dir))
    return _named(task, classnames)
  if source == 'jsonl':
    return _jsonl_captions(path)
  if source == 'karpathy':
    return _karpathy(path, data_dir)
  raise EvalDataError(f'unknown retrieval source {source!r} in {spec!r}: use jsonl or karpathy.')


def _image_folder(root):
  if not os.path.isdir(root):
    raise EvalDataError(f'image folder {root!r} not found.')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise EvalDataError(f'{root!r} has no class folders (expected {root}/CLASS/*.jpg).')
  images = []
  for label, name in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, name))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise EvalDataError(f'class folder {os.path.join(root, name)!r} has no images.')
    images += [(os.path.join(root, name, f), label) for f in files]
  return Task('zeroshot', f'imagefolder:{os.path.basename(os.path.normpath(root))}', images,
              class_names=[c.replace('_', ' ') for c in classes])


def _named(task, classnames):
  """The task with --classnames' names, which must be as many as its classes."""
  if not classnames:
    return task
  if not os.path.isfile(classnames):
    raise EvalDataError(f'class names file {classnames!r} not found.')
  names = read_lines(classnames)
  if len(names) != len(task.class_names):
    raise EvalDataError(f'{task.name} has {len(task.class_names)} classes; {classnames} names '
                        f'{len(names)}.')
  return dataclasses.replace(task, class_names=names)


def _linear(spec, source, root):
  splits = [s for s in ('test', 'val') if os.path.isdir(os.path.join(root, s))]
  if source != 'imagefolder' or not os.path.isdir(os.path.join(root, 'train')) or not splits:
    raise EvalDataError(f'{spec!r}: a linear probe reads linear:imagefolder:DIR with '
                        'DIR/train/CLASS/* and DIR/test/CLASS/* (or val).')
  train, test = _image_folder(os.path.join(root, 'train')), _image_folder(
      os.path.join(root, splits[0]))
  if train.class_names != test.class_names:
    raise EvalDataError(f'{root}: train and {splits[0]} have other class folders.')
  return dataclasses.replace(train, kind='linear', name=f'linear:{os.path.basename(root)}',
                             test=test)


def _shards(pattern, classnames):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from contrastive.data import shard_index  # pylint: disable=g-import-not-at-top
  from contrastive.data import webdataset  # pylint: disable=g-import-not-at-top
  if not classnames:
    raise EvalDataError('zeroshot:wds:PATTERN needs --classnames FILE (config.eval.classnames).')
  try:
    cfg = webdataset.settings(ml_collections.ConfigDict(dict(name='webdataset')))
    shards = webdataset.Shards(shard_index.expand(pattern), cfg)
  except (FileNotFoundError, ValueError) as e:
    raise EvalDataError(str(e)) from None
  names = read_lines(classnames) if os.path.isfile(classnames) else []
  index = {n: i for i, n in enumerate(names)}
  items = []
  for s, path in enumerate(shards.paths):
    labels = webdataset._labels(path, 'label', index)  # pylint: disable=protected-access
    items += [(int(shards.starts[s]) + i, labels[k]) for i, k in enumerate(shards.shard_keys(s))
              if labels.get(k, -1) >= 0]
  if not items:
    raise EvalDataError(f'{pattern}: no sample has a \'label\' in its JSON naming a class.')
  return Task('zeroshot', f'wds:{os.path.basename(pattern)}', items,
              class_names=names or [''], shards=shards)


def _tfds(name, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir or os.path.join('~', 'tensorflow_datasets'))
  split = SPLITS.get(name, 'test')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise EvalDataError(f'tfds dataset {name!r} (split {split!r}) is not prepared as '
                        f'array_record in {data_dir!r} ({type(e).__name__}: {str(e)[:150]}); '
                        'tfds cannot download here: prepare it where it can, or use '
                        'zeroshot:imagefolder:DIR.') from None
  names = (read_lines(os.path.join(DATA, CLASS_FILES[name])) if name in CLASS_FILES else
           [n.replace('_', ' ') for n in builder.info.features['label'].names])
  if builder.info.features['label'].num_classes != len(names):
    raise EvalDataError(f'{name!r} has {builder.info.features["label"].num_classes} classes; '
                        f'the class list has {len(names)}.')
  return Task('zeroshot', name, [(i, None) for i in range(len(source))], class_names=names,
              tfds_source=source)


def _jsonl_captions(path):
  if not os.path.isfile(path):
    raise EvalDataError(f'captions file {path!r} not found.')
  root, index, images, captions = os.path.dirname(os.path.abspath(path)), {}, [], []
  for n, line in enumerate(read_lines(path)):
    try:
      record = json.loads(line)
      image, text = record['image'], str(record['text'])
    except (ValueError, KeyError, TypeError):
      raise EvalDataError(f'{path}:{n + 1}: expected {{"image": path, "text": caption}}.') from None
    image = os.path.join(root, image)
    if image not in index:
      index[image] = len(images)
      images.append(image)
    captions.append((index[image], text))
  return _retrieval_task(f'jsonl:{os.path.basename(path)}', images, captions)


def _karpathy(path, data_dir):
  if not os.path.isfile(path):
    raise EvalDataError(f'Karpathy split file {path!r} not found.')
  with open(path, encoding='utf-8') as f:
    entries = [e for e in json.load(f)['images'] if e.get('split') == 'test']
  root = data_dir or os.path.dirname(os.path.abspath(path))
  images = [os.path.join(root, e.get('filepath', ''), e['filename']) for e in entries]
  captions = [(i, s['raw']) for i, e in enumerate(entries) for s in e['sentences']]
  return _retrieval_task(f'karpathy:{os.path.basename(path)}', images, captions)


def _retrieval_task(name, images, captions):
  missing = [p for p in images if not os.path.isfile(p)]
  if missing or not images:
    raise EvalDataError(f'{name}: {len(missing)} of {len(images)} images not found, e.g. '
                        f'{missing[:1]}.' if images else f'{name}: no images.')
  return Task('retrieval', name, images, captions=captions)


@dataclasses.dataclass
class Batches:
  """Decoded images of a task in batches: iterate for (images [list of uint8 HxWx3],
  labels [n] int or item indices [n]); unreadable images are skipped and counted."""
  task: Task
  batch_size: int
  skipped: int = 0

  def _decode(self, item):
    if self.task.tfds_source is not None:
      record = self.task.tfds_source[item[0]]
      return np.asarray(record['image'], np.uint8), int(record['label'])
    if self.task.shards is not None:
      image = self.task.shards.sample(item[0])[0]
      if image is None:
        raise ValueError('unusable sample')
      with Image.open(io.BytesIO(image)) as decoded:
        return np.asarray(decoded.convert('RGB'), np.uint8), item[1]
    path = item[0] if isinstance(item, tuple) else item
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'), np.uint8), (item[1] if isinstance(item, tuple)
                                                           else None)

  def __iter__(self):
    items = self.task.images
    for start in range(0, len(items), self.batch_size):
      images, labels = [], []
      for n, item in enumerate(items[start:start + self.batch_size], start):
        try:
          image, label = self._decode(item)
        except (OSError, ValueError, SyntaxError):
          self.skipped += 1
          continue
        if image.ndim == 2:
          image = np.stack([image] * 3, axis=-1)
        images.append(image[..., :3])
        labels.append(n if label is None else label)
      if images:
        yield images, np.asarray(labels, np.int64)
