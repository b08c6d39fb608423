"""Host-side batch composition for dual encoders: which rows share a global batch.

In-batch negatives are only as hard as the batch: these methods choose the rows of every
global batch, deterministically from (seed, step) or from (seed, epoch) plans cut into steps,
so a run resumes exactly at any step, and process p reads rows [p b, (p + 1) b) of each global
batch as `pipeline.train_loader` does.

  shuffle     'random': train_loader's shuffle (RandomStream gives its batches exactly)
  topics      'tas_b': one k-means topic per batch, balanced over the epoch (TAS-B)
  clusters    'clusters': whole equal-size clusters of the current embeddings (NGAME)
  neighbours  'neighbours': seeds and their nearest neighbours (Sample4Geo)
  dedup       no_duplicates: no two rows with one key in a batch (any method, keys=...)
  plan        epoch_order (one epoch's [S, B] rows), plan (checked, for the loader), EpochPlan
  loader      composed_loader: a plan as a resumable grain dataset, process_slice
  from_config config.batching of the two-tower recipes (tas_b, no_duplicates) -> the loader

Usage (the iterator's get_state() goes into the checkpoint, as train_loader's does):

    p = plan('tas_b', num_rows=len(source), global_batch_size=256,
             clusters=topic_clusters(query_embeddings, 64, seed=0), keys=group_ids)
    it = iter(composed_loader(source, p, global_batch_size=256, seed=0))
"""

from contrastive.batching.clusters import balanced_clusters
from contrastive.batching.dedup import DedupStats
from contrastive.batching.dedup import no_duplicates
from contrastive.batching.loader import composed_loader
from contrastive.batching.loader import global_rows
from contrastive.batching.loader import process_slice
from contrastive.batching.neighbours import neighbour_table
from contrastive.batching.plan import EpochPlan
from contrastive.batching.plan import epoch_order
from contrastive.batching.plan import METHODS
from contrastive.batching.plan import plan
from contrastive.batching.shuffle import RandomStream
from contrastive.batching.topics import topic_clusters
