"""The run's identity: the resolved config saved in the workdir, compared on every resume.

A checkpoint only makes sense with the config that made it. The first start of a run writes
`<workdir>/config.json`; every later start compares its config with it, field by field
(dotted paths such as `model.width`), before anything is compiled:

- FREE fields change freely (recorded in `config_changes.jsonl`): the mesh and device count,
  evaluation, logging and profiling, checkpoint cadence, fault handling, where the data files
  live.
- FIXED fields can never change on resume: they shape the state or the data order (the model,
  batch size — the data position is stored in batches —, queue, dtype, optimizer, seed,
  dataset, tokenizer, LiT lock, batch composition, NegCLIP, mined and static negatives). Use
  a new workdir. FREE wins where both match (the dataset's folders).
- Every other field (schedule length, learning rate, loss temperature, augmentations, ...)
  may change only when named in `config.allow_config_changes` (comma-separated fields or
  prefixes, e.g. `--config.allow_config_changes=total_steps,optimizer.lr`): the resumed run
  then differs from an uninterrupted one, which the user must ask for.

An accepted start rewrites config.json, so the next resume compares with the latest config.
"""

import datetime
import json
import os

from contrastive.config_lib import ConfigError

CONFIG_NAME = 'config.json'
CHANGES_NAME = 'config_changes.jsonl'

FREE = ('mesh', 'eval', 'log_every', 'profile_steps', 'checkpoint_every', 'checkpoint_keep',
        'nonfinite', 'max_consecutive_skips', 'allow_config_changes', 'dataset.data_dir',
        'dataset.idx_dir', 'model_init',  # model_init only acts on a fresh start, and so
        'static_negatives.from_workdir')  # does the static bank's source (then restored)
FIXED = ('model', 'batch_size', 'queue_size', 'dtype', 'optimizer.name', 'seed', 'dataset',
         'method', 'mcl', 'family', 'tokenizer', 'lit', 'batching', 'negclip',
         'hard_negatives', 'static_negatives')


def flatten(config):
  """{dotted path: JSON value} of a ConfigDict (tuples become lists, as in config.json)."""
  def walk(prefix, value, out):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f'{prefix}.{k}' if prefix else k, v, out)
    else:
      out[prefix] = value
    return out
  tree = config.to_dict() if hasattr(config, 'to_dict') else config
  return walk('', json.loads(json.dumps(tree, default=str)), {})


def _matches(field, rules):
  return any(field == r or field.startswith(r + '.') for r in rules)


def allowed_changes(config):
  """The field names or prefixes of config.allow_config_changes."""
  text = config.get('allow_config_changes') or ''
  return tuple(s.strip() for s in text.split(',') if s.strip())


def diff(saved, current):
  """{field: (saved value, current value)} for fields present in both flat configs that differ.

  Fields in one only (a config written by an older or newer version of the code) are ignored.
  """
  return {k: (saved[k], current[k]) for k in sorted(saved.keys() & current.keys())
          if saved[k] != current[k]}


def check_changes(changes, allowed):
  """Raises ConfigError if `changes` ({field: (old, new)}) includes a refused field."""
  fixed_allowed = [a for a in allowed if _matches(a, FIXED)]  # a prefix such as 'optimizer'
  # is fine: its FIXED fields (optimizer.name) stay refused below
  if fixed_allowed:
    raise ConfigError(f'config.allow_config_changes names {fixed_allowed}, which can never change '
                      f'on resume (they shape the state or the data order: {FIXED}); use a new '
                      '--workdir.')
  fixed = {k: v for k, v in changes.items() if _matches(k, FIXED) and not _matches(k, FREE)}
  other = {k: v for k, v in changes.items()
           if not _matches(k, FIXED) and not _matches(k, FREE) and not _matches(k, allowed)}
  show = lambda d: ', '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in d.items())
  if fixed:
    raise ConfigError(f'The workdir holds a run with a different config ({show(fixed)}); these '
                      'fields shape the checkpointed state or the data order, so resuming would '
                      'not continue that run: use a new --workdir (or the saved config).')
  if other:
    raise ConfigError(f'The workdir holds a run with a different config ({show(other)}); to '
                      'resume with these changes, add --config.allow_config_changes='
                      f'{",".join(other)} (the resumed run then differs from an uninterrupted '
                      'one), or use a new --workdir.')


def _write_json(path, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one


def load_saved(workdir):
  """The flat config saved in `workdir`, or None if there is none."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}); restore it from a copy or delete it to '
                      'accept the current config as the run\'s.') from None


def check(config, workdir, *, resuming):
  """The changed fields {field: (old, new)} of `config` against the workdir's saved config;
  raises ConfigError for a refused change.

  resuming: the workdir has a checkpoint. Without one there is nothing to continue, and the
    current config simply becomes the run's (no changes).
  """
  saved = load_saved(workdir) if resuming else None
  changes = {} if saved is None else diff(saved, flatten(config))
  check_changes(changes, allowed_changes(config))
  return changes


def record(config, workdir, changes, *, resuming, **facts):
  """Saves `config` as the run's and appends the start to config_changes.jsonl (process 0).

  changes: from `check`; facts: what else this start ran with (e.g. devices=8, processes=1),
  recorded as is.
  """
  if changes:
    print('Config changes on resume: ' + ', '.join(
        f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items()), flush=True)
  _write_json(os.path.join(workdir, CONFIG_NAME), flatten(config))
  entry = dict(time=datetime.datetime.now().isoformat(timespec='seconds'), resumed=resuming,
               changes={k: list(v) for k, v in changes.items()}, **facts)
  with open(os.path.join(workdir, CHANGES_NAME), 'a', encoding='utf-8') as f:
    f.write(json.dumps(entry) + '\n')


def check_and_record(config, workdir, *, resuming, write=True, **facts):
  """`check`, then `record` if `write`; returns the changed fields {field: (old, new)}."""
  changes = check(config, workdir, resuming=resuming)
  if write:
    record(config, workdir, changes, resuming=resuming, **facts)
  return changes
