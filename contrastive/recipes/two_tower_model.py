"""A trained two-tower model for inference (`inference.load`): embed images and texts.

Images of any size are resized (bilinear) to the image tower's, or, where the workdir records
config.preprocess.resize = 'short_side_crop' (an imported CLIP: contrastive/weights), the
shorter side resized (bicubic) and the centre cropped as open_clip's eval transform does;
texts are tokenized and cut at the context length as in training.
"""

from PIL import Image
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive.data import mixture
from contrastive.models import two_tower as two_tower_lib


def model_config(config):
  """config.model with the text towers' vocab_size and context taken from config.tokenizer."""
  model = ml_collections.ConfigDict(config.model.to_dict())
  for side in ('image', 'text', 'a', 'b'):
    tower = model.get(side)
    if tower is not None and tower.get('name') == 'text':
      tower.vocab_size = config.tokenizer.vocab_size
      tower.context = config.tokenizer.context
  return model


class TwoTowerModel:
  """A trained two-tower model's encoders (see the module docstring)."""

  def __init__(self, config, variables, tokenizer, step):
    self.config, self.variables, self.tokenizer, self.step = config, variables, tokenizer, step
    self.module = two_tower_lib.build_two_tower(model_config(config))
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
    """uint8 images [N, H, W, 3] (any H, W; or a list of [H, W, 3] of different sizes) ->
    L2-normalised float32 [N, D]."""
    if self.image_size is None:
      raise ValueError('This model has no image tower (a text-text model): use encode_text / '
                       'encode_a.')
    if (self.config.get('preprocess') or {}).get('resize') == 'short_side_crop':
      images = np.stack([short_side_crop(x, self.image_size) for x in images])
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encode_image takes uint8 images [N, H, W, 3], got shape {images.shape}.')
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


def short_side_crop(image, size):
  """uint8 [H, W, 3] -> [size, size, 3]: the shorter side resized to `size` (Pillow bicubic;
  the longer side int(size * long / short)), then the centre crop (offsets rounded half to
  even), as torchvision's Resize(size) + CenterCrop(size) on a PIL image (open_clip's eval
  transform)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}.')
  h, w = image.shape[:2]
  new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  pil = Image.fromarray(image)
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)
