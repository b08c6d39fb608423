"""The recipe families, one module each, behind one interface (`base.Recipe`):

  image_views  SimCLR, MoCo v2/v3 and the negative samplers (configs/simclr_fmnist.py, ...)
  two_tower    CLIP, SigLIP, LiT (configs/siglip_emoji.py, ...)

`get(config)` is the one place a config's family is looked up; adding a family is one module
here plus its configs (docs/recipes.md).
"""

from contrastive.config_lib import ConfigError
from contrastive.recipes import image_views
from contrastive.recipes import two_tower
from contrastive.recipes.base import Parts
from contrastive.recipes.base import Recipe
from contrastive.recipes.base import RefreshedTable

RECIPES = {r.name: r for r in (image_views.RECIPE, two_tower.RECIPE)}
DEFAULT_FAMILY = 'image_views'


def get(config):
  """The `Recipe` of config.family (default: image_views); ConfigError if unknown."""
  family = config.get('family', DEFAULT_FAMILY)
  if family not in RECIPES:
    raise ConfigError(f'config.family={family!r} is unknown; choose one of {tuple(RECIPES)}.')
  return RECIPES[family]
