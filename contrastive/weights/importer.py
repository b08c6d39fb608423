"""Public checkpoints in and out: an imported checkpoint becomes an ordinary two-tower workdir
(config.json, tokenizer, checkpoints/0) that `inference.load`, the evaluator and
`config.model_init.workdir` read like a trained run's; a workdir exports back to the format.

    import_checkpoint('open_clip', 'ViT-B-32', 'model.safetensors', None, 'W')
    export_workdir('W', 'open_clip', 'out.safetensors')

Everything is checked before anything is written, and the workdir is written into a temporary
folder renamed at the end: a failed import leaves nothing behind.
"""

import hashlib
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from contrastive import checkpoint
from contrastive import run_config
from contrastive.data import tokenizers
from contrastive.models import two_tower
from contrastive.recipes.two_tower_model import model_config as tower_config
from contrastive.weights import big_vision_format
from contrastive.weights import convert
from contrastive.weights import open_clip_format

FORMATS = {'open_clip': open_clip_format, 'big_vision': big_vision_format}
TORCH_PICKLE = ('.pt', '.pth', '.bin')


def _format(name):
  if name not in FORMATS:
    raise convert.WeightsError(f'unknown format {name!r}; choose one of {tuple(FORMATS)}.')
  return FORMATS[name]


def read_state(path):
  """{key: float32 array} of a checkpoint file in the file's order (.safetensors; .npz)."""
  if not os.path.isfile(path):
    raise convert.WeightsError(f'checkpoint {path!r} not found.')
  if path.endswith(TORCH_PICKLE):
    raise convert.WeightsError(
        f'{path!r} is a pickled torch file: convert it once where torch is installed, '
        f'python -c "import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, '
        f'v in torch.load(\'{path}\', map_location=\'cpu\').items()}}, \'model.safetensors\')"')
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework='numpy') as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise convert.WeightsError(f'{path!r} is not a readable checkpoint ({type(e).__name__}: '
                               f'{str(e)[:200]}).') from None


def workdir_config(fmt, arch, checkpoint_path, tokenizer_cfg, overrides=None):
  """The config.json of an imported workdir: the two-tower family, the architecture's model,
  its tokenizer and its image preprocessing. overrides: the format's model_config overrides,
  plus 'image_size', 'vocab_size' and 'context' (other sizes than the architecture's)."""
  overrides = dict(overrides or {})
  image_size = overrides.pop('image_size', fmt.image_size(arch))
  tokenizer_cfg = dict(tokenizer_cfg,
                       vocab_size=overrides.pop('vocab_size', tokenizer_cfg['vocab_size']),
                       context=overrides.pop('context', tokenizer_cfg['context']))
  return ml_collections.ConfigDict(dict(
      family='two_tower', seed=0, model=fmt.model_config(arch, overrides),
      tokenizer=tokenizer_cfg, dataset=dict(name='imported', image_size=image_size),
      preprocess=dict(fmt.PREPROCESS), loss=dict(name=fmt.LOSS),
      weights=dict(format=fmt.NAME, arch=arch, checkpoint=os.path.abspath(checkpoint_path),
                   sha256=_sha256(checkpoint_path))))


def _sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _abstract_params(config):
  module = two_tower.build_two_tower(tower_config(config))
  s = config.dataset.image_size
  inputs = (np.zeros((1, s, s, 3), np.uint8), np.zeros((1, config.tokenizer.context), np.int32))
  return module, jax.eval_shape(lambda r: module.init(r, *inputs), jax.random.key(0))['params']


def import_checkpoint(format_name, arch, checkpoint_path, tokenizer_path, workdir,
                      overrides=None):
  """Writes `workdir` from a public checkpoint; returns the number of parameters.
  overrides: as `workdir_config`'s."""
  fmt = _format(format_name)
  if os.path.exists(workdir) and os.listdir(workdir):
    raise convert.WeightsError(f'{workdir!r} exists and is not empty: import into a new one.')
  try:
    fmt.model_config(arch)
  except ValueError as e:
    raise convert.WeightsError(str(e)) from None
  tokenizer, tokenizer_cfg = tokenizers.load_file(fmt.TOKENIZER, tokenizer_path,
                                                  fmt.tokenizer_config(arch))
  config = workdir_config(fmt, arch, checkpoint_path, tokenizer_cfg, overrides)
  module, abstract = _abstract_params(config)
  params = convert.to_params(fmt.tensors(module.tower_a, module.tower_b),
                             fmt.normalize_state(read_state(checkpoint_path)), abstract,
                             zero=fmt.ZERO, identity=fmt.IDENTITY, skip=fmt.BUFFERS,
                             source=checkpoint_path)
  parent = os.path.dirname(os.path.abspath(workdir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.import-', dir=parent)
  try:
    run_config._write_json(os.path.join(tmp, run_config.CONFIG_NAME),  # pylint: disable=protected-access
                           run_config.flatten(config))
    tokenizers.save_to_workdir(tokenizer, tmp)
    with ocp.StandardCheckpointer() as writer:
      writer.save(os.path.join(tmp, 'checkpoints', '0', 'state'), {'params': params})
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # empty (checked above)
    os.rename(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def export_workdir(workdir, format_name, out):
  """Writes the latest checkpoint of a two-tower `workdir` (imported or trained with the
  format's architecture) as a `format_name` checkpoint file `out`."""
  from contrastive import inference  # pylint: disable=g-import-not-at-top
  fmt = _format(format_name)
  config = inference.load_config(workdir)
  module = two_tower.build_two_tower(tower_config(config))
  params = checkpoint.read_state(checkpoint.latest_step_dir(workdir))['params']
  try:
    state = convert.to_state(fmt.tensors(module.tower_a, module.tower_b), params,
                             zero=fmt.ZERO, identity=fmt.IDENTITY)
  except (KeyError, AttributeError) as e:
    raise convert.WeightsError(f'{workdir!r} is not a {format_name} architecture (no parameter '
                               f'{e}).') from None
  fmt.write(state, out)
  return len(state)
