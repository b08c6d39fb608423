"""How the two towers start and which of them learn: LiT's lock in the optimizer, and parameter
groups copied from another workdir's checkpoint (`config.model_init`).

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") locks a tower:
it and its projection get no gradient step and no optimizer state.
"""

import jax
import ml_collections
import numpy as np
import optax

from contrastive import checkpoint
from contrastive import optim
from contrastive.config_lib import ConfigError

# config.lit.locked_tower -> the parameter groups it freezes.
LOCKS = {'': (), 'a': ('tower_a', 'proj_a'), 'b': ('tower_b', 'proj_b'),
         'image': ('tower_a', 'proj_a'), 'text': ('tower_b', 'proj_b')}


def optimizer(opt_cfg, params, steps, *, batch_size, locked=()):
  """(tx, schedule): `optim.build_optimizer` of opt_cfg, with the groups `locked` frozen (no
  state, zero update) and the temperature/bias ('logit') at `opt_cfg.logit_lr_mult` times the
  learning rate. params: the model's parameter groups (shapes suffice)."""
  cfg = ml_collections.ConfigDict(dict(opt_cfg, batch_size=batch_size))
  tx, schedule = optim.build_optimizer(cfg, steps)
  logit_tx = optax.chain(optim.build_optimizer(cfg, steps)[0],
                         optax.scale(opt_cfg.get('logit_lr_mult', 1.0)))
  labels = {k: 'locked' if k in locked else 'logit' if k == 'logit' else 'train' for k in params}
  labels = {k: jax.tree.map(lambda _, l=label: l, params[k]) for k, label in labels.items()}
  return optax.multi_transform({'train': tx, 'logit': logit_tx, 'locked': optax.set_to_zero()},
                               labels), schedule


def parse_mapping(text):
  """'encoder:tower_a,x:y' -> [('encoder', 'tower_a'), ('x', 'y')]."""
  pairs = [p.split(':') for p in text.split(',') if p.strip()]
  if any(len(p) != 2 for p in pairs):
    raise ConfigError(f'config.model_init.mapping={text!r}: expected src:dst,... pairs.')
  return [(a.strip(), b.strip()) for a, b in pairs]


def init_from_checkpoint(params, batch_stats, workdir, mapping):
  """(params, batch_stats) with the groups of `mapping` ('src:dst,...') copied from the latest
  checkpoint of `workdir`; raises ConfigError if a group is missing or a shape differs."""
  try:
    step_dir = checkpoint.latest_step_dir(workdir)
  except checkpoint.CheckpointError as e:
    raise ConfigError(f'config.model_init.workdir: {e}') from None
  saved = checkpoint.read_state(step_dir)
  params, batch_stats = dict(params), dict(batch_stats)
  for src, dst in parse_mapping(mapping):
    for name, tree, saved_tree in (('params', params, saved['params']),
                                   ('batch_stats', batch_stats, saved.get('batch_stats') or {})):
      if dst not in tree:
        continue
      if src not in saved_tree:
        raise ConfigError(f'config.model_init.mapping: {name} group {src!r} is not in '
                          f'{step_dir} (it has {sorted(saved_tree)}).')
      want = jax.tree.map(np.shape, tree[dst])
      got = jax.tree.map(np.shape, saved_tree[src])
      if want != got:
        raise ConfigError(f'config.model_init.mapping {src}:{dst}: the {name} shapes of '
                          f'the checkpoint differ from the model\'s ({got} vs {want}).')
      tree[dst] = jax.tree.map(lambda s, t: np.asarray(s, t.dtype), saved_tree[src], tree[dst])
  print(f'Initialised {parse_mapping(mapping)} from {step_dir}.', flush=True)
  return params, batch_stats
