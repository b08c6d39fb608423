"""Batch plans recomputed from the current towers: NGAME's clusters and Sample4Geo's neighbours.

  --config.batching.method=clusters --config.batching.cluster_size=8 \\
      --config.batching.recluster_every=1        # NGAME (Dahiya et al. 2023), in epochs
  --config.batching.method=neighbours --config.batching.num_neighbours=4 \\
      --config.batching.per_seed=1               # Sample4Geo (Deuser et al. 2023)

At the start of every period (recluster_every epochs of the plan) the training loop embeds
every row's side a with the current towers and recomputes the period's structure:

- clusters: `clusters.balanced_clusters` of the embeddings into N // c clusters of exactly c
  rows (c = cluster_size); each batch is B / c whole clusters, so a row's in-batch negatives
  are the rows the model currently places nearest (NGAME, sec. 3);
- neighbours: `neighbours.neighbour_table`, the k = num_neighbours nearest rows of each row;
  each batch is random seed rows, each followed by per_seed of its not-yet-used neighbours
  (Sample4Geo, sec. 3.3).

The structure is a field of the train state (`TrainState.composition`, [N] or [N, k] int32),
saved with every checkpoint, and the loader reads each batch when the loop asks for it
(`composed_loader(prefetch=0)`), after the period's structure is computed: so the batches of a
period are a pure function of (seed, step, the state at the period's first step), and a run
resumes exactly. Period 0 uses the starting towers (random-init, or a previous stage's).
"""

import jax
import numpy as np

from contrastive.batching import clusters as clusters_lib
from contrastive.batching import neighbours as neighbours_lib

METHODS = ('clusters', 'neighbours')


class PeriodicPlan:
  """The current period's clusters or neighbour table, refreshed by the training loop.

  Args:
    method: 'clusters' or 'neighbours'.
    items: [M, ...] the distinct side-a items; a_of_row: [N] each row's item.
    size: cluster_size c ('clusters') or num_neighbours k ('neighbours').
    recluster_every: epochs per period; seed: the run's seed.
  """

  metric = 'batching'
  field = 'composition'

  def __init__(self, method, *, items, a_of_row, size, recluster_every, seed):
    self.method, self.items, self.a_of_row = method, items, np.asarray(a_of_row).reshape(-1)
    self.size, self.every, self.seed = int(size), int(recluster_every), int(seed)
    self.steps_per_epoch = None  # set from the plan (`from_config.train_loader`)
    self.period, self.current = None, None

  def shape(self):
    """The state field's shape: [N] assignments or [N, k] neighbours."""
    n = len(self.a_of_row)
    return (n,) if self.method == 'clusters' else (n, self.size)

  def structure(self, period):
    """The plan's argument for `period` (called by the plan); it must be computed already."""
    if period != self.period:
      raise RuntimeError(f'batching: the {self.method} of period {period} are asked for before '
                         f'the loop computed them (it has period {self.period}).')
    return self.current

  def _period(self, step):
    return step // (self.steps_per_epoch * self.every)

  def due(self, step):
    """True before the first update of every period (loader step s = its first batch)."""
    return step % (self.steps_per_epoch * self.every) == 0

  def compute(self, embed, state, period):
    """The structure of `period` from the towers of `state` (embed: fn(state, side, items))."""
    z = embed(state, 'a', self.items)[self.a_of_row]
    if self.method == 'clusters':
      return clusters_lib.balanced_clusters(z, self.size, self.seed + period).astype(np.int32)
    return neighbours_lib.neighbour_table(z, self.size).astype(np.int32)

  def refresh(self, embed, state, step):
    """The state with the structure of the period starting at loader step `step`."""
    self.period = self._period(step)
    self.current = self.compute(embed, state, self.period)
    return state.replace(composition=jax.device_put(self.current, state.composition.sharding))

  def sync(self, state, step):
    """After a restore at loader step `step`: the saved structure is that of its period."""
    self.period = self._period(step)
    self.current = np.asarray(state.composition.addressable_data(0))

  def attach(self, batch):
    """The batch unchanged (the structure acts on which rows it holds)."""
    return batch

  def describe(self):
    what = (f'clusters of {self.size} rows' if self.method == 'clusters' else
            f'{self.size} nearest neighbours')
    return (f'{what} of the current towers\' side a, recomputed every {self.every} epoch(s) '
            f'({self.steps_per_epoch * self.every} steps)')
