"""config.batching clusters / neighbours (contrastive/batching/periodic.py): plans recomputed by
the loop from the current towers every period, kept in the train state, read by a loader
without read-ahead; the loop is simulated here as train.py runs it (refresh at a period's
first step, then next(batch)), with a resume from a mid-period checkpoint."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from contrastive import parallel
from contrastive import step as step_lib
from contrastive.batching import from_config


class Rows:
  """N rows {'a': [2] float32, 'id': int32}: 4 tight blobs of 16 rows."""

  def __init__(self):
    rng = np.random.default_rng(0)
    centres = np.array([[10, 0], [0, 10], [-10, 0], [0, -10]], np.float32)
    self.blob = np.repeat(np.arange(4), 16)
    self.a = centres[self.blob] + rng.normal(0, 0.5, (64, 2)).astype(np.float32)
    self.ids = np.arange(64, dtype=np.int32)

  def __len__(self):
    return 64

  def __getitems__(self, indices):
    return [{'a': self.a[i], 'id': self.ids[i], 'row': np.int32(i)} for i in indices]

  def side_a(self, indices, texts_b=False):
    del texts_b
    indices = np.asarray(list(indices))
    return {'a': self.a[indices], 'id': self.ids[indices]}


def embed(state, side, items):
  """'Towers' whose embedding depends on the state: the rows shifted by 8 in the direction of
  the state's angle, so their directions (cosine neighbours, clusters) change with it."""
  assert side == 'a'
  angle = float(state.params['angle'])
  return np.asarray(items) + 8 * np.array([np.cos(angle), np.sin(angle)], np.float32)


def config(**batching):
  return ml_collections.ConfigDict(dict(batch_size=16, seed=3, batching=dict(
      from_config.DEFAULTS, **batching)))


def new_state(periodic):
  mesh = parallel.make_mesh([('data', -1)])
  return step_lib.TrainState(
      step=0, params={'angle': 0.0}, batch_stats={}, opt_state=(), skipped_steps=0,
      composition=jax.device_put(np.full(periodic.shape(), -1, np.int32),
                                 parallel.replicated(mesh)))


def run(cfg, steps, *, angles, resume_at=None):
  """The loop's batches of steps 0 .. steps - 1; the state's angle at loader step s is
  angles[s]; with resume_at=c the loop is rebuilt at step c from the saved (state, grain
  state) of that step, as after a kill."""
  source = Rows()
  loader, _, plan = from_config.train_loader(cfg, source, embed_a=None, with_plan=True)
  periodic, it = plan.periodic, iter(loader)
  state = new_state(periodic)
  periodic.sync(state, 0)
  out, structures = [], {}
  for s in range(steps):
    state = state.replace(params={'angle': angles[s]})  # training moves the towers
    if s == resume_at:
      saved_state, saved_data = state, it.get_state()
      loader, _, plan = from_config.train_loader(cfg, source, embed_a=None, with_plan=True)
      periodic, it = plan.periodic, iter(loader)
      it.set_state(saved_data)
      state = saved_state
      periodic.sync(state, s)
    if periodic.due(s):
      state = periodic.refresh(embed, state, s)
      structures[periodic.period] = periodic.current
    out.append(next(it)['row'])
  return np.stack(out), structures, periodic.steps_per_epoch


@pytest.mark.parametrize('method, fields', [
    ('clusters', dict(cluster_size=4)),
    ('neighbours', dict(num_neighbours=3, per_seed=1)),
])
def test_recomputed_every_period_and_resumed_mid_period(method, fields):
  cfg = config(method=method, recluster_every=1, **fields)
  angles = np.repeat([0.0, np.pi / 2, 0.3], 4)  # the towers change between the epochs
  batches, structures, steps_per_epoch = run(cfg, 12, angles=angles)
  assert steps_per_epoch == 4 and sorted(structures) == [0, 1, 2]
  assert not np.array_equal(structures[0], structures[1])  # recomputed from the new towers
  for s, rows in enumerate(batches):
    structure = structures[s // 4]
    if method == 'clusters':  # whole clusters of the period's assignment
      _, counts = np.unique(structure[rows], return_counts=True)
      assert (counts % 4 == 0).all()
  for e in range(3):  # every row once per epoch
    assert sorted(batches[4 * e:4 * e + 4].ravel().tolist()) == list(range(64))
  if method == 'neighbours':  # a row is often followed by one of its period's neighbours
    def near(batches):
      return np.mean([r[i + 1] in structures[s // 4][r[i]]
                      for s, r in enumerate(batches) for i in range(15)])
    assert near(batches) > 0.2
    rng = np.random.default_rng(0)  # counterexample: shuffled batches, ~3/63 of the pairs
    assert near([rng.permutation(64)[:16] for _ in range(12)]) < 0.1
  resumed, _, _ = run(cfg, 12, angles=angles, resume_at=6)
  np.testing.assert_array_equal(resumed, batches)


def test_asking_for_a_period_before_it_is_computed_fails_loudly():
  cfg = config(method='clusters', cluster_size=4)
  loader, _, _ = from_config.train_loader(cfg, Rows(), embed_a=None, with_plan=True)
  with pytest.raises(RuntimeError, match='period 0 are asked for before the loop computed'):
    next(iter(loader))


def test_clusters_change_the_batches_against_the_plain_shuffle():
  cfg = config(method='clusters', cluster_size=8)
  batches, structures, _ = run(cfg, 4, angles=np.zeros(4))
  # clusters of 8 by the first coordinate: each batch holds 2 clusters, i.e. <= 2 blobs mostly
  blob = Rows().blob
  assert np.mean([len(set(blob[r])) for r in batches]) <= 2.5
  plain, _ = from_config.train_loader(config(), Rows(), embed_a=None)
  plain = [b['a'] for b in itertools.islice(iter(plain), 4)]
  assert min(len(set(np.sign(np.round(b[:, 0])).tolist() + [0])) for b in plain) >= 2
  del structures


@pytest.mark.parametrize('fields, message', [
    (dict(method='clusters', cluster_size=32), r'clusters larger than the batch \(cluster_size '
     r'32 > global_batch_size 16\)'),
    (dict(method='clusters', cluster_size=6), r'cluster_size 6 must divide global_batch_size'),
    (dict(method='clusters'), r'cluster_size=0: method clusters needs >= 1'),
    (dict(method='neighbours'), r'num_neighbours=0: method neighbours needs >= 1'),
    (dict(cluster_size=4), r'cluster_size=4 applies to method clusters only'),
    (dict(method='neighbours', num_neighbours=2, recluster_every=0), r'recluster_every=0 must '
     r'be >= 1'),
])
def test_bad_fields_are_one_line_errors(fields, message):
  with pytest.raises(ValueError, match=message) as e:
    from_config.check(config(**fields))
  assert '\n' not in str(e.value)
