"""How the two towers start and which of them learn: LiT's lock in the optimizer, and parameter
groups copied from another workdir's checkpoint (`config.model_init`).

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") locks a tower:
it and its projection get no gradient step and no optimizer state.
"""

import os
import tempfile

import jax
import ml_collections
import numpy as np
import optax

from contrastive import checkpoint
from contrastive import optim
from contrastive.config_lib import ConfigError
from contrastive.data import tokenizers

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


def check_init(config, groups, lock):
  """Raises ConfigError, before anything is read or compiled, for a `config.model_init` that
  copies nothing (no mapping, or a destination that is none of the model's parameter groups
  `groups`) and for a LiT lock (`lock`: the groups of config.lit.locked_tower) whose encoder
  nothing loads: a random frozen tower learns nothing, so it needs
  `config.lit.allow_random_locked=True` (e.g. a baseline)."""
  init = config.get('model_init') or {}
  mapping = parse_mapping(init.get('mapping') or '') if init.get('workdir') else []
  if init.get('workdir') and not mapping:
    raise ConfigError(f'config.model_init.workdir={init.workdir!r} with no mapping copies '
                      'nothing: set --config.model_init.mapping=src:dst,... (e.g. '
                      'tower_a:tower_a,proj_a:proj_a).')
  unknown = sorted({dst for _, dst in mapping} - set(groups))
  if unknown:
    raise ConfigError(f'config.model_init.mapping={init.mapping!r}: {unknown} is not a '
                      f'parameter group of this model (it has {sorted(groups)}).')
  encoder = [g for g in lock if g.startswith('tower_')]
  loaded = {dst for _, dst in mapping}
  if encoder and not set(encoder) <= loaded and not (config.get('lit') or {}).get(
      'allow_random_locked', False):
    raise ConfigError(f'config.lit locks {encoder[0]}, but config.model_init loads nothing '
                      'into it, so it would stay random: set --config.model_init.workdir=W '
                      f'--config.model_init.mapping={encoder[0]}:{encoder[0]},... (a trained '
                      'or imported run), or --config.lit.allow_random_locked=True.')


def check_same_tokenizer(config, tokenizer, text_groups):
  """Raises ConfigError if `config.model_init` copies a text tower (a group of `text_groups`)
  from a workdir, or `config.static_negatives` embeds its bank with the towers of one, whose
  tokenizer differs from this run's `tokenizer` (the token embeddings would be read with
  other pieces' ids)."""
  init = config.get('model_init') or {}
  copied = [dst for _, dst in parse_mapping(init.get('mapping') or '') if dst in text_groups]
  static = config.get('static_negatives') or {}
  uses = [(f'config.model_init copies the text tower {copied[0]} from', init.get('workdir'))
          ] if init.get('workdir') and copied else []
  if static.get('num_static') and static.get('from_workdir'):
    uses.append(('config.static_negatives embeds its bank\'s texts with the text tower of',
                 static['from_workdir']))
  kind = (config.get('tokenizer') or {}).get('kind', 'sentencepiece')
  for what, workdir in uses:
    theirs = os.path.join(workdir, tokenizers.FILES[kind])
    if not os.path.isfile(theirs):
      raise ConfigError(f'{what} {workdir!r}, which has no {tokenizers.FILES[kind]}: its token '
                        'ids cannot be matched to this run\'s tokenizer.')
    with tempfile.TemporaryDirectory() as tmp:
      tokenizers.save_to_workdir(tokenizer, tmp)
      with open(os.path.join(tmp, tokenizers.FILES[kind]), 'rb') as f:
        ours = f.read()
    with open(theirs, 'rb') as f:
      same = f.read() == ours
    if not same:
      raise ConfigError(f'{what} {workdir!r}, trained with another tokenizer than this run\'s: '
                        f'copy {theirs} into this workdir before the first start to use its '
                        'pieces.')


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
