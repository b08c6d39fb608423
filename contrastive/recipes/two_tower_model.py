"""A trained two-tower model for inference (`inference.load`): embed images and texts.

Images of any size are resized (bilinear) to the image tower's, or as the workdir's
config.preprocess says (an imported checkpoint's: contrastive/weights): 'short_side_crop'
(open_clip's eval transform: the shorter side resized, bicubic, the centre cropped) or
'squash' (big_vision's resize: the whole image to S x S, bilinear without antialiasing, cast
to uint8 by truncation); texts are tokenized and cut at the context length as in training.
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
    """Rows of x through tower `method`, batch_size at a time, each batch split over the
    local devices (padded to a multiple of their number)."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ('data',)),
                                          jax.sharding.PartitionSpec('data'))
    out = []
    for i in range(0, len(x), batch_size):
      chunk = np.asarray(x[i:i + batch_size])
      pad = -len(chunk) % len(devices)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      z = self._encode[method](self.variables, jax.device_put(chunk, sharding))
      out.append(np.asarray(z, np.float32)[:len(chunk) - pad])
    width = self.config.model.embed_dim * self.config.model.get('head_count', 1)
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)

  def encode_image(self, images, *, batch_size=256):
    """Images [N, H, W, 3] (any H, W; or a list of [H, W, 3] of different sizes), uint8 or
    float in [0, 1] (rounded to uint8) -> L2-normalised float32 [N, D]."""
    if self.image_size is None:
      raise ValueError('This model has no image tower (a text-text model): use encode_text / '
                       'encode_a.')
    images = [as_uint8(x) for x in images] if isinstance(images, (list, tuple)) else \
        as_uint8(images)
    preprocess = self.config.get('preprocess') or {}
    if preprocess.get('resize') == 'short_side_crop':
      images = np.stack([short_side_crop(x, self.image_size) for x in images])
    elif preprocess.get('resize') == 'squash':
      images = np.stack([squash(x, self.image_size, antialias=preprocess.get('antialias', True),
                                floor=preprocess.get('rounding') == 'floor') for x in images])
    elif not isinstance(images, np.ndarray) and len({np.shape(x) for x in images}) > 1:
      images = np.stack([squash(x, self.image_size) for x in images])  # sizes differ
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encode_image takes uint8 images [N, H, W, 3], got shape {images.shape}.')
    s = self.image_size
    if images.shape[1:3] != (s, s):
      images = np.asarray(jnp.clip(jnp.round(jax.image.resize(
          images.astype(np.float32), (images.shape[0], s, s, 3), 'bilinear')), 0, 255), np.uint8)
    return self._batched('encode_a', images.astype(np.uint8), batch_size)

  def tokenize(self, texts):
    """A string or a list of strings -> [N, L] int32 ids, as in training."""
    texts = [texts] if isinstance(texts, (str, bytes)) else list(texts)
    bad = [t for t in texts if not isinstance(t, (str, bytes))]
    if bad:
      raise TypeError(f'texts must be strings; got {type(bad[0]).__name__} {bad[0]!r:.40}.')
    return self.tokenizer.encode(texts, self.config.tokenizer.context)[0]

  def encode_text(self, texts, *, batch_size=256):
    """list[str] -> L2-normalised float32 [N, D] (tower b)."""
    return self._batched('encode_b', self.tokenize(texts), batch_size)

  def encode_tokens(self, tokens, *, batch_size=256):
    """tokens [N, L] (`tokenize`'s) -> L2-normalised float32 [N, D] (tower b)."""
    return self._batched('encode_b', np.asarray(tokens, np.int32), batch_size)

  def encode_a(self, texts, *, batch_size=256):
    """Tower a on texts (text-text models such as siglip_wordnet: the word tower)."""
    return self._batched('encode_a', self.tokenize(texts), batch_size)


def as_uint8(images):
  """uint8 images as they are; float images in [0, 1] as round(255 x); anything else a
  ValueError in one line."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1 or
                        np.isnan(images).any()):
      raise ValueError(f'float images must be in [0, 1]; got values in [{np.nanmin(images)}, '
                       f'{np.nanmax(images)}] (uint8 images: pass them as uint8).')
    return np.round(images * 255).astype(np.uint8)
  raise ValueError(f'images must be uint8 or float in [0, 1]; got {images.dtype}.')


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


def squash(image, size, *, antialias=True, floor=False):
  """uint8 [H, W, 3] -> [size, size, 3]: the whole image resized (bilinear, half-pixel
  centres; without antialiasing as tf.image.resize's default), then cast to uint8 (truncated
  with `floor`, as big_vision's float-to-uint8 cast; else rounded)."""
  image = np.asarray(image)
  if image.shape[:2] == (size, size):
    return image.astype(np.uint8)
  out = jax.image.resize(jnp.asarray(image, jnp.float32), (size, size, 3), 'linear',
                         antialias=antialias)
  out = jnp.clip(jnp.floor(out) if floor else jnp.round(out), 0, 255)
  return np.asarray(out, np.uint8)
