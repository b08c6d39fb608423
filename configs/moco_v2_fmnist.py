r"""MoCo v2 on Fashion-MNIST: momentum encoder keys and a memory queue of 4096 past keys.

  python -m contrastive.main --config configs/moco_v2_fmnist.py --workdir /tmp/moco_v2
  python -m contrastive.main --config configs/moco_v2_fmnist.py:runlocal,mochi --workdir /tmp/m

He et al. 2020 (MoCo) with Chen et al. 2020's v2 changes (MLP head, stronger augmentation,
tau = 0.2), on the same encoder, batch, optimizer and step budget as configs/simclr_fmnist.py,
so the two are comparable. The queue (K = 4096 = 16 batches) is split along the mesh's data
axis and read whole by every device: InfoNCE over B keys + K queue entries, the query's own
earlier keys masked out. Unlike the paper (q1-k2 only) the loss is symmetrised, which learns
faster in a short run; `--config.symmetric=False` gives the original. Variants: those of
simclr_fmnist.py (`runlocal`, samplers such as `mining`, `mochi`, `ft`, `threshold`, `gist`,
`loss=amcl`: AMCL's 4 heads with the momentum encoder and queue, no sampler).
"""

from contrastive import config_lib


def get_config(arg=None):
  """The MoCo v2 config; `arg`: comma-separated variants as in simclr_fmnist.py."""
  simclr = config_lib.sibling(__file__, 'simclr_fmnist.py')
  config = simclr.get_config(arg)
  config.method = 'moco'
  config.momentum = dict(base=0.99, schedule='constant')  # 0.999 in the paper's 200 epochs
  config.queue_size = 256 if config.batch_size == 64 else 4096  # runlocal: 4 batches
  # `:loss=amcl`: AMCL's heads, each with its own queue slice and temperature; else InfoNCE.
  if config.loss.name != 'amcl':
    config.loss = simclr.loss_config('info_nce', temperature=0.2)
  return config
