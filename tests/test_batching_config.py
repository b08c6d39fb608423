"""config.batching (contrastive/batching/from_config.py): the two-tower recipes' batches from
the config; the composition itself is tested in tests/test_batching.py, the SIGKILL resume of a
composed run in tests/test_two_tower_main.py (slow)."""

import itertools

import ml_collections
import numpy as np
import pytest

from contrastive.batching import from_config


class Rows:
  """A random-access source of N rows {'a': [2] float32, 'id': int32}."""

  def __init__(self, a, ids):
    self.a, self.ids = a, ids

  def __len__(self):
    return len(self.ids)

  def __getitems__(self, indices):
    return [{'a': self.a[i], 'id': np.int32(self.ids[i])} for i in indices]

  def side_a(self, indices):
    indices = np.asarray(indices)
    return {'a': self.a[indices], 'id': self.ids[indices].astype(np.int32)}


def config(**batching):
  return ml_collections.ConfigDict(dict(batch_size=16, seed=3, batching=dict(
      from_config.DEFAULTS, **batching)))


def topics_data():
  """4 well-separated blobs of 64 rows (4 batches each); ids 0..63 in each blob (so a batch
  of one blob never repeats one, a batch across blobs may)."""
  rng = np.random.default_rng(0)
  centres = np.array([[10, 0], [0, 10], [-10, 0], [0, -10]], np.float32)
  topic = np.repeat(np.arange(4), 64)
  a = centres[topic] + rng.normal(0, 0.5, (256, 2)).astype(np.float32)
  ids = np.arange(256) % 64
  return Rows(a, ids), topic


def batches(loader, n):
  return [b for b in itertools.islice(iter(loader), n)]


def test_tas_b_with_no_duplicates_batches_one_topic_without_repeated_ids():
  source, topic = topics_data()
  loader, line = from_config.train_loader(
      config(method='tas_b', num_topics=4, no_duplicates=True), source, embed_a=np.asarray)
  assert 'tas_b: 4 topics' in line and 'no duplicates' in line
  seen = batches(loader, 12)
  one_topic = [len(set(topic[_rows(source, b)])) == 1 for b in seen]
  assert sum(one_topic) >= len(seen) - 3  # 'fill': at most k - 1 batches mix two topics
  for b in seen:
    assert len(set(b['id'].tolist())) == len(b['id'])  # no_duplicates
  # Counterexample: the plain shuffle mixes the topics and repeats ids in these batches.
  plain, _ = from_config.train_loader(config(), source, embed_a=None)
  plain = batches(plain, 12)
  assert min(len(set(topic[_rows(source, b)])) for b in plain) > 1
  assert any(len(set(b['id'].tolist())) < len(b['id']) for b in plain)


def _rows(source, batch):
  """The row indices of a batch's 'a' values (unique floats here)."""
  lookup = {tuple(v): i for i, v in enumerate(source.a.tolist())}
  return np.array([lookup[tuple(v)] for v in batch['a'].tolist()])


def test_random_is_train_loader_and_needs_no_embedding():
  source, _ = topics_data()
  assert not from_config.composed(ml_collections.ConfigDict(dict(batch_size=16, seed=3)))
  loader, line = from_config.train_loader(config(), source, embed_a=None)
  assert line == 'random shuffle'
  from contrastive.data import pipeline  # pylint: disable=g-import-not-at-top
  ref = pipeline.train_loader(source, global_batch_size=16, seed=3)
  for got, want in zip(batches(loader, 3), batches(ref, 3)):
    np.testing.assert_array_equal(got['a'], want['a'])


@pytest.mark.parametrize('fields, message', [
    (dict(method='ance'), r"config.batching.method='ance' is unknown; choose one of"),
    (dict(method='tas_b'), r'num_topics=0: tas_b needs >= 1 topic'),
    (dict(num_topics=8), r'num_topics=8 applies to method tas_b only'),
])
def test_bad_fields_are_one_line_errors(fields, message):
  with pytest.raises(ValueError, match=message) as e:
    from_config.check(config(**fields))
  assert '\n' not in str(e.value)


def test_unknown_field_is_named():
  cfg = config()
  cfg.batching.topics = 3
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['topics'\]"):
    from_config.check(cfg)
