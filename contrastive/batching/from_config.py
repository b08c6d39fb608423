"""`config.batching`: the two-tower recipes' batch composition, chosen in the config.

  config.batching = dict(
      method='random',      # train_loader's shuffle; or 'tas_b': each global batch from one
                            # k-means topic of side a (Hofstatter et al. 2021, `topics.py`);
                            # 'clusters' (NGAME) / 'neighbours' (Sample4Geo): from the
                            # current towers, recomputed every period (`periodic.py`)
      num_topics=0,         # tas_b: k, topics of the starting towers' side-a embeddings
      no_duplicates=False,  # no two rows with one group id in a global batch (`dedup.py`)
      cluster_size=0,       # clusters: NGAME's c rows per cluster of the current embeddings
      num_neighbours=0,     # neighbours: Sample4Geo's k nearest rows of each row
      per_seed=1,           # neighbours: placed next to each seed row
      recluster_every=1)    # clusters / neighbours: epochs between recomputations

e.g. `--config.batching.method=tas_b --config.batching.num_topics=32
--config.batching.no_duplicates=True`.

TAS-B clusters the queries with a trained baseline. Here the topics come from the towers the
run starts from: random-init, or a previous stage's tower through `config.model_init` (LiT or a
staged run). They are a pure function of the initial state and the seed, so a resumed run
recomputes the same topics, and the grain state saved in each checkpoint resumes the data
stream exactly (`loader.composed_loader`). The group ids are the dataset's false-negative ids
(same emoji, same synset): with `no_duplicates` a batch holds each group at most once, so the
id mask of the loss removes no negative.
"""

import numpy as np

from contrastive import config_lib
from contrastive.batching import clusters as clusters_lib
from contrastive.batching import periodic
from contrastive.batching.loader import composed_loader
from contrastive.batching.mixture_plan import MixturePlan
from contrastive.batching.plan import plan as make_plan
from contrastive.batching.shuffle import RandomStream
from contrastive.batching.topics import topic_clusters
from contrastive.config_lib import ConfigError
from contrastive.data import mixture
from contrastive.data import pipeline

METHODS = ('random', 'tas_b') + periodic.METHODS
DEFAULTS = dict(method='random', num_topics=0, no_duplicates=False, cluster_size=0,
                num_neighbours=0, per_seed=1, recluster_every=1)


def settings(config):
  """config.batching with its defaults filled in (configs without the field: random)."""
  return config_lib.section(config, 'batching', DEFAULTS)


def check(config):
  """Raises ConfigError naming the field, before any data is read or anything compiled."""
  cfg = settings(config)  # unknown fields raise there
  if cfg['method'] not in METHODS:
    raise ConfigError(f'config.batching.method={cfg["method"]!r} is unknown; choose one of '
                      f'{METHODS}.')
  k = int(cfg['num_topics'])
  if cfg['method'] == 'tas_b' and k < 1:
    raise ConfigError(f'config.batching.num_topics={k}: tas_b needs >= 1 topic.')
  if cfg['method'] != 'tas_b' and k:
    raise ConfigError(f'config.batching.num_topics={k} applies to method tas_b only '
                      f'(method is {cfg["method"]!r}).')
  own = {'clusters': 'cluster_size', 'neighbours': 'num_neighbours'}
  for method, field in own.items():
    value = int(cfg[field])
    if cfg['method'] == method and value < 1:
      raise ConfigError(f'config.batching.{field}={value}: method {method} needs >= 1.')
    if cfg['method'] != method and value:
      raise ConfigError(f'config.batching.{field}={value} applies to method {method} only '
                        f'(method is {cfg["method"]!r}).')
  if cfg['method'] == 'clusters':
    try:
      clusters_lib.check_cluster_size(cfg['cluster_size'], config.batch_size, config.batch_size)
    except ValueError as e:
      raise ConfigError(f'config.batching.cluster_size: {e}') from None
  if mixture.is_mixture(config.get('dataset')) and composed(config):
    raise ConfigError(f'config.batching.method={cfg["method"]!r}: a mixture composes its '
                      'batches by config.dataset.fractions; use random.')
  if int(cfg['recluster_every']) < 1 or int(cfg['per_seed']) < 0:
    raise ConfigError(f'config.batching: recluster_every={cfg["recluster_every"]} must be >= 1 '
                      f'and per_seed={cfg["per_seed"]} >= 0.')


def composed(config):
  """True if config.batching asks for more than train_loader's shuffle."""
  cfg = settings(config)
  return cfg['method'] != 'random' or bool(cfg['no_duplicates'])


def train_loader(config, source, embed_a, *, with_plan=False):
  """The training stream of config.batching: `pipeline.train_loader` for the plain shuffle,
  else `composed_loader` over the plan (each process reads its rows of every global batch).

  Args:
    config: the recipe config (batch_size, seed, batching).
    source: the training rows (`pair_batches.TokenizedPairs`: {'a', 'b', 'id', ...}), with
      `side_a(indices)` -> {'a', 'id'} of those rows.
    embed_a: items [N, ...] of side a -> [N, D] numpy embeddings (the starting towers'; only
      called for tas_b; clusters and neighbours are computed by the loop through
      `plan.periodic`, a `periodic.PeriodicPlan`).

  Returns:
    (grain dataset, description): the description is a line for the log (topics, rows that
    no_duplicates moves or drops per epoch); with `with_plan` also the plan, whose
    `rows(s, seed)` are the global rows of the loader's batch s (of training step s + 1).
  """
  if mixture.is_mixture(config.get('dataset')):  # fixed rows per part in every batch
    sizes = mixture.part_batch_sizes(config.dataset, config.batch_size)
    plan = MixturePlan(source.sizes, sizes)
    loader = composed_loader(source, plan, global_batch_size=config.batch_size,
                             seed=config.seed)
    line = ', '.join(f'{b} rows of {name}' for name, b in zip(source.names, sizes))
    return (loader, f'mixture: {line} per batch') + ((plan,) if with_plan else ())
  if not composed(config):
    loader = pipeline.train_loader(source, global_batch_size=config.batch_size,
                                   seed=config.seed)
    stream = RandomStream(num_rows=len(source), global_batch_size=config.batch_size)
    return (loader, 'random shuffle') + ((stream,) if with_plan else ())
  cfg, n = settings(config), len(source)
  rows = source.side_a(range(n))  # every row once: group ids and side a
  keys = rows['id'] if cfg['no_duplicates'] else None
  method_args, line = {}, cfg['method']
  if cfg['method'] in periodic.METHODS:  # recomputed by the loop from the current towers
    items, a_of_row = np.unique(rows['a'].reshape(n, -1), axis=0, return_inverse=True)
    recompute = periodic.PeriodicPlan(
        cfg['method'], items=items.reshape(-1, *rows['a'].shape[1:]), a_of_row=a_of_row,
        size=cfg['cluster_size'] or cfg['num_neighbours'],
        recluster_every=int(cfg['recluster_every']), seed=config.seed)
    if cfg['method'] == 'clusters':
      method_args = dict(assignments=recompute.structure, cluster_size=int(cfg['cluster_size']))
    else:
      method_args = dict(neighbours=recompute.structure, per_seed=int(cfg['per_seed']))
    method_args['recluster_every'] = int(cfg['recluster_every'])
  if cfg['method'] == 'tas_b':
    clusters = topic_clusters(embed_a(rows['a']),
                              int(cfg['num_topics']), seed=config.seed)
    sizes = np.bincount(clusters, minlength=int(cfg['num_topics']))
    method_args['clusters'] = clusters
    line += (f': {int(cfg["num_topics"])} topics of the starting towers\' side a, '
             f'{int((sizes > 0).sum())} non-empty, sizes {int(sizes.min())}..{int(sizes.max())}')
  plan = make_plan(cfg['method'], num_rows=n, global_batch_size=config.batch_size, keys=keys,
                   **method_args)
  if keys is not None and cfg['method'] not in periodic.METHODS:  # (those: not computed yet)
    stats = plan.stats(0, config.seed)
    line += (f'; no duplicates: {plan.steps_per_epoch} batches per epoch, {stats.pushed} rows '
             f'moved to a later batch, {stats.dropped} rows not in epoch 0')
  prefetch = 2
  if cfg['method'] in periodic.METHODS:
    recompute.steps_per_epoch = plan.steps_per_epoch
    plan.periodic, prefetch = recompute, 0  # each batch read after its period's structure
    line += f': {recompute.describe()}'
  loader = composed_loader(source, plan, global_batch_size=config.batch_size, seed=config.seed,
                           prefetch=prefetch)
  return (loader, line) + ((plan,) if with_plan else ())
