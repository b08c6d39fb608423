"""Batch composition (contrastive/batching): determinism, coverage, each method's promise,
no_duplicates, exact resume, process slices, 'random' == train_loader, and bad inputs."""

import jax
import numpy as np
import pytest

from contrastive import batching
from contrastive.batching import dedup
from contrastive.data import pipeline

N = 600


class Rows:
  """A tiny in-memory random-access source: record i is {'id': i, 'x': [2] floats}."""

  def __init__(self, n):
    self.x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)

  def __len__(self):
    return len(self.x)

  def __getitem__(self, i):
    return {'id': np.int32(i), 'x': self.x[i]}

  def __getitems__(self, indices):
    return [self[int(i)] for i in indices]


@pytest.fixture(scope='module')
def embeddings():
  """N points around 6 well-separated centres (so clusters and neighbours mean something)."""
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 8)) * 10
  return centres[rng.integers(0, 6, N)] + rng.normal(size=(N, 8))


@pytest.fixture(scope='module')
def args(embeddings):
  """Every method's arguments for the N rows: hand-made topics of uneven sizes, balanced
  clusters of 4 rows, and a 5-neighbour table."""
  topics = np.repeat(np.arange(5), [200, 150, 130, 70, 50])[np.random.default_rng(1).permutation(N)]
  return {'random': {},
          'tas_b': dict(clusters=topics),
          'clusters': dict(assignments=batching.balanced_clusters(embeddings, 4, seed=0),
                           cluster_size=4),
          'neighbours': dict(neighbours=batching.neighbour_table(embeddings, 5), per_seed=2)}


def order(method, args, epoch=0, seed=0, b=32, **kw):
  return batching.epoch_order(method, epoch, seed, num_rows=N, global_batch_size=b,
                              **args[method], **kw)


@pytest.mark.parametrize('method', batching.METHODS)
def test_deterministic_in_seed_and_epoch(method, args):
  first = order(method, args, epoch=3, seed=7)
  np.testing.assert_array_equal(first, order(method, args, epoch=3, seed=7))
  assert not np.array_equal(first, order(method, args, epoch=3, seed=8))
  assert not np.array_equal(first, order(method, args, epoch=4, seed=7))


@pytest.mark.parametrize('method', ['random', 'tas_b', 'neighbours'])
@pytest.mark.parametrize('b', [8, 32, 50, 600])
def test_every_row_once_per_epoch(method, b, args):
  batches, stats = order(method, args, b=b, with_stats=True)
  count = np.bincount(batches.ravel(), minlength=N)
  assert batches.shape == (N // b, b) and count.max() == 1
  assert stats.dropped == N % b == N - count.sum()


@pytest.mark.parametrize('b', [8, 32, 48])
def test_clusters_batches_are_whole_clusters(b, args):
  assignments = args['clusters']['assignments']
  assert np.bincount(assignments).tolist() == [4] * (N // 4)  # equal sizes
  batches = order('clusters', args, b=b)
  assert batches.shape == (N // b, b)
  assert np.bincount(batches.ravel(), minlength=N).max() == 1
  for batch in batches:
    ids, counts = np.unique(assignments[batch], return_counts=True)
    assert len(ids) == b // 4 and set(counts) == {4}


def test_balanced_clusters_sizes_leftover_and_locality(embeddings):
  ids = batching.balanced_clusters(embeddings[:597], 8, seed=1)
  assert (ids < 0).sum() == 597 % 8 and np.bincount(ids[ids >= 0]).tolist() == [8] * (597 // 8)
  np.testing.assert_array_equal(ids, batching.balanced_clusters(embeddings[:597], 8, seed=1))
  # Clusters are tight: mean distance to the cluster centre well below the data's spread.
  x = embeddings[:597][ids >= 0] / np.linalg.norm(embeddings[:597][ids >= 0], axis=1)[:, None]
  centres = np.stack([x[ids[ids >= 0] == c].mean(0) for c in range(597 // 8)])
  within = np.linalg.norm(x - centres[ids[ids >= 0]], axis=1).mean()
  assert within < 0.5 * np.linalg.norm(x - x.mean(0), axis=1).mean()


@pytest.mark.parametrize('b', [8, 32])
def test_tas_b_one_cluster_per_batch(b, args):
  topics = args['tas_b']['clusters']
  sizes = np.bincount(topics)
  drop, stats = order('tas_b', args, b=b, partial='drop', with_stats=True)
  assert all(len(set(topics[batch])) == 1 for batch in drop)
  assert len(drop) == np.sum(sizes // b) and stats.dropped == np.sum(sizes % b)
  assert np.bincount(drop.ravel(), minlength=N).max() == 1
  fill = order('tas_b', args, b=b)  # partial='fill': boundary batches only may mix
  pure = [topics[batch[0]] for batch in fill if len(set(topics[batch])) == 1]
  assert len(fill) - len(pure) <= len(sizes) - 1
  assert np.all(np.bincount(pure, minlength=len(sizes)) >= sizes // b - 1)  # ~ cluster sizes
  assert np.bincount(fill.ravel(), minlength=N).max() == 1


def test_topic_clusters_reuse_kmeans(embeddings):
  topics = batching.topic_clusters(embeddings[:128], 6, seed=0, num_iters=5)
  assert topics.shape == (128,) and topics.min() >= 0 and topics.max() < 6
  batches = batching.epoch_order('tas_b', 0, 0, num_rows=128, global_batch_size=8,
                                 clusters=topics, partial='drop')
  assert all(len(set(topics[batch])) == 1 for batch in batches)


def test_neighbours_seeds_bring_their_neighbours(embeddings):
  pairs = (np.arange(N) ^ 1)[:, None]  # row i's only neighbour is its partner i ^ 1
  batches = batching.epoch_order('neighbours', 0, 0, num_rows=N, global_batch_size=32,
                                 neighbours=pairs)
  for batch in batches:  # every batch is a union of whole pairs
    assert set(batch.tolist()) == set((batch ^ 1).tolist())
  table = batching.neighbour_table(embeddings, 3)
  batches = batching.epoch_order('neighbours', 0, 0, num_rows=N, global_batch_size=30,
                                 neighbours=table, per_seed=2)
  near = lambda batches: np.mean([np.isin(table[b], b).any(1).mean() for b in batches])
  random_batches = np.random.default_rng(0).permutation(N)[:len(batches) * 30].reshape(-1, 30)
  assert near(batches) > 0.5 > 3 * near(random_batches)  # rows with a neighbour in the batch


@pytest.mark.parametrize('method', batching.METHODS)
def test_no_duplicates(method, args):
  keys = np.random.default_rng(2).integers(0, 60, N)  # ~10 rows per key
  batches, stats = order(method, args, keys=keys, with_stats=True)
  assert batches.shape == (N // 32, 32) and stats.dropped_batches == 0
  assert all(len(set(keys[batch])) == 32 for batch in batches)
  assert np.bincount(batches.ravel()).max() == 1 and stats.dropped == N - batches.size
  assert stats.pushed > 0
  text = np.array([f'text {k}' for k in keys])  # string keys (e.g. text hashes) work too
  np.testing.assert_array_equal(order(method, args, keys=text), batches)


def test_no_duplicates_swaps_and_drops():
  keys = np.arange(64) % 32  # two rows per key, B = 32: every batch needs all 32 keys
  batches, stats = dedup.no_duplicates(np.random.default_rng(0).permutation(64).reshape(2, 32),
                                       [], keys)
  assert stats.dropped == 0 and all(len(set(keys[batch])) == 32 for batch in batches)
  keys = np.concatenate([np.arange(320) % 32, np.full(280, 99)])  # 33 keys: 10 batches of 32
  p = batching.plan('random', num_rows=N, global_batch_size=32, keys=keys)
  assert p.steps_per_epoch == dedup.feasible_steps(np.bincount(keys), 32, N // 32) < N // 32
  stats = p.stats(0, 5)
  assert stats.dropped_batches == N // 32 - p.steps_per_epoch
  assert stats.dropped == N - 32 * p.steps_per_epoch > N % 32
  assert all(len(set(keys[batch])) == 32 for batch in p(0, 5))


def ids(it, n):
  return [next(it)['id'].tolist() for _ in range(n)]


@pytest.mark.parametrize('method', batching.METHODS)
def test_loader_resumes_exactly(method, args):
  p = batching.plan(method, num_rows=N, global_batch_size=32, **args[method])
  loader = lambda: iter(batching.composed_loader(Rows(N), p, global_batch_size=32, seed=4))
  it = loader()
  ids(it, 25)  # past the first epoch (18 steps)
  state = it.get_state()
  after = ids(it, 5)
  resumed = loader()
  resumed.set_state(state)
  assert ids(resumed, 5) == after
  np.testing.assert_array_equal(after, batching.global_rows(p, 4, 30)[25:])
  assert not np.array_equal(after, batching.global_rows(p, 5, 30)[25:])  # another seed


def test_random_equals_train_loader():
  for n, b, steps in ((N, 64, 20), (N, 32, 20), (96, 32, 7)):  # 600 / 64: straddling epochs
    source = Rows(n)
    p = batching.plan('random', num_rows=n, global_batch_size=b)
    mine = ids(iter(batching.composed_loader(source, p, global_batch_size=b, seed=3)), steps)
    theirs = ids(iter(pipeline.train_loader(source, global_batch_size=b, seed=3)), steps)
    assert mine == theirs
  plan_rows = batching.epoch_order('random', 1, 3, num_rows=96, global_batch_size=32)
  np.testing.assert_array_equal(plan_rows, np.array(theirs[3:6]))  # B | N: the same epochs


def test_process_slices_concatenate_to_global_batch(monkeypatch, args):
  p = batching.plan('clusters', num_rows=N, global_batch_size=32, **args['clusters'])
  whole = ids(iter(batching.composed_loader(Rows(N), p, global_batch_size=32, seed=1)), 3)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    parts.append(ids(iter(batching.composed_loader(Rows(N), p, global_batch_size=32, seed=1)),
                     3))
  assert [a + b for a, b in zip(*parts)] == whole and len(parts[0][0]) == 16
  rows = np.arange(12)
  assert np.concatenate([batching.process_slice(rows, i, 3) for i in range(3)]).tolist() == \
      rows.tolist()


def test_reclustering_callable_is_asked_per_period(embeddings):
  asked, stored = [], {}

  def assignments(period):  # the caller's reclustering, stored (here: in memory) per period
    asked.append(period)
    if period not in stored:
      stored[period] = batching.balanced_clusters(embeddings, 4, seed=period)
    return stored[period]

  p = batching.plan('clusters', num_rows=N, global_batch_size=32, cluster_size=4,
                    assignments=assignments, recluster_every=2)
  rows = batching.global_rows(p, 0, 4 * p.steps_per_epoch)
  assert asked == [0, 1]
  for step, batch in enumerate(rows):
    ids_ = stored[step // p.steps_per_epoch // 2][batch]
    assert set(np.unique(ids_, return_counts=True)[1]) == {4}


def test_bad_inputs_raise_one_line(args):
  bad = [
      (dict(method='clusters', assignments=args['clusters']['assignments'], cluster_size=64),
       'clusters larger than the batch'),
      (dict(method='clusters', assignments=args['clusters']['assignments'], cluster_size=5),
       'must divide global_batch_size'),
      (dict(method='random', global_batch_size=N + 1), 'larger than the dataset'),
      (dict(method='tas-b'), "unknown batching method 'tas-b'; known: random, tas_b, clusters"),
      (dict(method='neighbours', neighbours=np.zeros((N, 0), int)), 'must be \\[N, k\\]'),
      (dict(method='neighbours', neighbours=np.zeros((N - 1, 3), int)), 'must be \\[N, k\\]'),
      (dict(method='random', keys=np.zeros(N - 1)), 'keys must be \\[N\\] = \\[600\\]'),
      (dict(method='random', keys=np.zeros(N)), 'no global batch of 32 rows with distinct'),
      (dict(method='tas_b', clusters=np.zeros(3, int)), 'clusters must be \\[N\\]'),
      (dict(method='clusters', assignments=np.zeros(N, int), cluster_size=4),
       'exactly c = 4 rows'),
      (dict(method='random', per_seed=1), 'unknown \\[\'per_seed\'\\]'),
  ]
  for kwargs, message in bad:
    kwargs = dict(dict(num_rows=N, global_batch_size=32), **kwargs)
    for fn in (batching.plan, lambda **kw: batching.epoch_order(epoch=0, seed=0, **kw)):
      with pytest.raises(ValueError, match=message) as e:
        fn(**kwargs)
      assert '\n' not in str(e.value)
  p = batching.plan('random', num_rows=N, global_batch_size=32)
  with pytest.raises(ValueError, match='for 600 rows; the source has 500'):
    batching.composed_loader(Rows(500), p, global_batch_size=32, seed=0)
  with pytest.raises(ValueError, match='wrap a function'):
    batching.composed_loader(Rows(N), lambda epoch, seed: None, global_batch_size=32, seed=0)
  p = batching.EpochPlan(lambda epoch, seed: np.zeros((3, 32), int), steps_per_epoch=2,
                         global_batch_size=32)
  with pytest.raises(ValueError, match='the plan is \\(3, 32\\); expected'):
    p.rows(0, 0)
