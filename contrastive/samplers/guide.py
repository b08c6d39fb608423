"""GISTEmbed with a frozen guide checkpoint (`config.samplers.gist_guide`).

GISTEmbed (Solatorio 2024) vetoes every in-batch candidate that a *guide* model rates more
similar to the query than the query's own positive (`masks.gist_keep`). By default the guide is
the momentum encoder (`config.momentum.base > 0`), which follows the online encoder. With

  --config.samplers.gist=True --config.samplers.gist_guide=/path/to/workdir

the guide is instead the latest checkpoint of another run of this codebase with the same model
(the paper's setting: a fixed, separately trained embedding model). Its parameters and
BatchNorm statistics take the momentum encoder's place in the train state (`ema_params`,
`ema_batch_stats`, so they are saved with every checkpoint and a resumed run keeps them) and
its momentum is 1: the guide never changes. The online encoder starts from its own
initialisation, not from the guide.

References:
  Solatorio 2024, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text
  Embedding Fine-tuning", arXiv:2402.16829.
"""


import jax

from contrastive import checkpoint
from contrastive.config_lib import ConfigError


def frozen(step):
  """The guide's momentum: 1 at every step (ema_update keeps it unchanged)."""
  del step
  return 1.0


def load_guide(state, path):
  """The state with ema_params / ema_batch_stats read from the latest checkpoint of workdir
  `path`, placed with the shardings of the state's own; raises ConfigError (one line) naming
  the first mismatching parameters if the checkpoint's model differs from this run's."""
  step_dir = checkpoint.latest_step_dir(path)
  saved = checkpoint.read_state(step_dir)
  guide = {'params': saved.get('params', {}), 'batch_stats': saved.get('batch_stats') or {}}
  want = {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  problems = checkpoint.structure_mismatch(guide, want)
  if problems:
    raise ConfigError(f'config.samplers.gist_guide: {step_dir} does not match this run\'s model '
                      f'({len(problems)} difference(s), e.g. {"; ".join(problems[:3])}).')
  placed = jax.tree.map(lambda x, ref: jax.device_put(x.astype(ref.dtype), ref.sharding),
                        guide, want)
  print(f'GIST guide: {step_dir} (frozen).', flush=True)
  return state.replace(ema_params=placed['params'], ema_batch_stats=placed['batch_stats'])
