r"""MoCo v3 on Fashion-MNIST: momentum encoder, predictor head, symmetric in-batch InfoNCE.

  python -m contrastive.main --config configs/moco_v3_fmnist.py --workdir /tmp/moco_v3

Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers": no
queue; the online branch adds a predictor MLP; each view's prediction must find the momentum
encoder's key of the other view among the global batch's keys; the momentum rises from 0.99
to 1 on a cosine schedule. Same encoder, batch, optimizer and step budget as
configs/simclr_fmnist.py. Variants: as in simclr_fmnist.py.
"""

from contrastive import config_lib


def get_config(arg=None):
  """The MoCo v3 config; `arg`: comma-separated variants as in simclr_fmnist.py."""
  simclr = config_lib.sibling(__file__, 'simclr_fmnist.py')
  config = simclr.get_config(arg)
  config.method = 'moco'
  config.momentum = dict(base=0.99, schedule='cosine')
  config.queue_size = 0
  config.model.predictor_hidden_dims = tuple(config.model.head_hidden_dims)
  config.loss = simclr.loss_config('info_nce', temperature=0.2)
  return config
