"""Use a trained model: load a workdir, embed images and texts.

    from contrastive import inference
    model = inference.load('/tmp/siglip_emoji')        # latest checkpoint + the saved config
    img = model.encode_image(images)                   # uint8 [N, H, W, 3] -> float32 [N, D]
    txt = model.encode_text(['grinning face', 'cat'])  # list[str] -> float32 [N, D]
    scores = img @ txt.T                               # cosine similarities (rows L2-normalised)

The workdir holds everything: `config.json` (the run's config, written at start),
`tokenizer.model` and `checkpoints/`. Images of any size are resized (bilinear) to the image
tower's; texts are tokenized and cut at the context length as in training
(contrastive/recipes/two_tower_model.py). A SimCLR/MoCo workdir loads as an encoder whose
`encode_image` gives the features the kNN and linear probe read
(contrastive/recipes/image_views.py).
"""

import json
import os

import ml_collections

from contrastive import checkpoint
from contrastive import recipes
from contrastive import run_config


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


def load(workdir, *, step=None):
  """The trained model of `workdir`'s latest (or given) checkpoint, on the default device: a
  two-tower run's `TwoTowerModel` (encode_image / encode_text), an image-views run's
  `EncoderModel` (encode_image: the encoder's features)."""
  config = load_config(workdir)
  step_dir = checkpoint.latest_step_dir(workdir, step=step)
  state = checkpoint.read_state(step_dir)
  variables = {'params': state['params']}
  if state.get('batch_stats'):
    variables['batch_stats'] = state['batch_stats']
  return recipes.get(config).load(config, variables, workdir, int(os.path.basename(step_dir)))
