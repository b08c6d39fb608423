"""Use a trained two-tower model: load a workdir, embed images and texts.

    from contrastive import inference
    model = inference.load('/tmp/siglip_emoji')        # latest checkpoint + the saved config
    img = model.encode_image(images)                   # uint8 [N, H, W, 3] -> float32 [N, D]
    txt = model.encode_text(['grinning face', 'cat'])  # list[str] -> float32 [N, D]
    scores = img @ txt.T                               # cosine similarities (rows L2-normalised)

The workdir holds everything: `config.json` (the run's config, written at start),
`tokenizer.model` and `checkpoints/`. Images of any size are resized (bilinear) to the image
tower's; texts are tokenized and cut at the context length as in training.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from contrastive import checkpoint
from contrastive import run_config
from contrastive import two_tower_recipe
from contrastive.data import mixture
from contrastive.data import pair_batches
from contrastive.data import tokenizer as tokenizer_lib
from contrastive.models import two_tower as two_tower_lib


def unflatten(flat):
  """{'model.image.name': 'vit', ...} (config.json) -> ConfigDict."""
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return ml_collections.ConfigDict(tree)


def load_config(workdir):
  """The config a workdir's run was started with."""
  path = os.path.join(workdir, run_config.CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: not a workdir of contrastive.main.')
  with open(path, encoding='utf-8') as f:
    return unflatten(json.load(f))


class TwoTowerModel:
  """A trained two-tower model's encoders (see the module docstring)."""

  def __init__(self, config, variables, tokenizer, step):
    self.config, self.variables, self.tokenizer, self.step = config, variables, tokenizer, step
    self.module = two_tower_lib.build_two_tower(two_tower_recipe.model_config(config))
    self.image_size = (mixture.image_size(config.dataset) if mixture.is_mixture(config.dataset)
                       and config.model.get('image') else config.dataset.get('image_size'))
    self._encode = {m: jax.jit(lambda v, x, m=m: self.module.apply(v, x, method=m,
                                                                   normalize=True))
                    for m in ('encode_a', 'encode_b')}

  def _batched(self, method, x, batch_size):
    out = [np.asarray(self._encode[method](self.variables, x[i:i + batch_size]), np.float32)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

  def encode_image(self, images, *, batch_size=256):
    """uint8 images [N, H, W, 3] (any H, W) -> L2-normalised float32 [N, D]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encode_image takes uint8 images [N, H, W, 3], got shape {images.shape}.')
    if self.image_size is None:
      raise ValueError('This model has no image tower (a text-text model): use encode_text / '
                       'encode_a.')
    s = self.image_size
    if images.shape[1:3] != (s, s):
      images = np.asarray(jnp.clip(jnp.round(jax.image.resize(
          images.astype(np.float32), (images.shape[0], s, s, 3), 'bilinear')), 0, 255), np.uint8)
    return self._batched('encode_a', images.astype(np.uint8), batch_size)

  def tokenize(self, texts):
    """list[str] -> [N, L] int32 ids, as in training."""
    return self.tokenizer.encode(list(texts), self.config.tokenizer.context)[0]

  def encode_text(self, texts, *, batch_size=256):
    """list[str] -> L2-normalised float32 [N, D] (tower b)."""
    return self._batched('encode_b', self.tokenize(texts), batch_size)

  def encode_a(self, texts, *, batch_size=256):
    """Tower a on texts (text-text models such as siglip_wordnet: the word tower)."""
    return self._batched('encode_a', self.tokenize(texts), batch_size)


def load(workdir, *, step=None):
  """The model of `workdir`'s latest (or given) checkpoint, on the default device."""
  config = load_config(workdir)
  if config.get('family') != 'two_tower':
    raise ValueError(f'{workdir} holds a {config.get("family", "image_views")!r} run; '
                     'inference.load reads two-tower workdirs.')
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {directory}.')
  step = steps[-1] if step is None else step
  state = checkpoint.read_state(os.path.join(directory, str(step)))
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(workdir, pair_batches.TOKENIZER_NAME))
  return TwoTowerModel(config, variables, tokenizer, step)
