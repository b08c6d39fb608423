"""Image augmentation for the two-tower recipes: config.augment, applied on device in the step.

The image tower sees one augmented view of each training image (`augment.one_view`: SimCLR's
random resized crop, colour jitter, greyscale and blur, one key per example from the step's rng
and the row's number in the global batch); evaluation sees the images as they are. Fields, as
the SimCLR recipe's (contrastive/data/augment.py):

  crop_scale (min, max) area fraction, flip, jitter_prob with brightness, contrast, saturation
  and hue, gray_prob, blur_prob; and sketch_prob: the view as a line drawing of its edges
  (`augment.line_drawing`: dark outlines on white, like a monochrome font's glyph).

Off (the defaults: no crop, no flip, every probability 0), the recipe's objective is unchanged:
the same step program as without the field.
"""

import jax
import ml_collections

from contrastive import objectives
from contrastive.config_lib import ConfigError
from contrastive.data import augment

DEFAULTS = dict(crop_scale=(1.0, 1.0), flip=False, jitter_prob=0.0, brightness=0.4, contrast=0.4,
                saturation=0.4, hue=0.1, gray_prob=0.0, blur_prob=0.0, sketch_prob=0.0)
_PROBABILITIES = ('jitter_prob', 'gray_prob', 'blur_prob', 'sketch_prob')
_SALT = 0x617567  # the augmentation's stream of the step's rng ('aug')


def settings(config):
  """config.augment with DEFAULTS filled in, or None when it changes no image. ConfigError
  (naming the field) for an unknown field or a value out of range."""
  given = dict(config.get('augment') or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f'config.augment: unknown field(s) {unknown}; the fields are '
                      f'{sorted(DEFAULTS)}.')
  cfg = dict(DEFAULTS, **given)
  low, high = (float(v) for v in cfg['crop_scale'])
  if not 0 < low <= high <= 1:
    raise ConfigError(f'config.augment.crop_scale={tuple(cfg["crop_scale"])} must be '
                      '(min, max) with 0 < min <= max <= 1.')
  for field in _PROBABILITIES:
    if not 0 <= cfg[field] <= 1:
      raise ConfigError(f'config.augment.{field}={cfg[field]!r} is not a probability.')
  active = (low, high) != (1.0, 1.0) or cfg['flip'] or any(
      cfg[f] > 0 for f in _PROBABILITIES)
  return ml_collections.FrozenConfigDict(cfg) if active else None


def wrap(objective, cfg):
  """`objective` with its rows' images (side a, [m, H, W, C]) replaced by one augmented view
  each; `objective` itself when cfg is None (`settings`)."""
  if cfg is None:
    return objective

  def embed(params, state, rows, rng):
    if rows['a'].ndim == 4:  # images (a text tower a's tokens are [m, L])
      views = augment.one_view(jax.random.fold_in(rng, _SALT), rows['a'], cfg,
                               indices=rows.get('index'))
      rows = dict(rows, a=views)
    return objective.embed(params, state, rows, rng)

  return objectives.Objective(embed, objective.loss)
