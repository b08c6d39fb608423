"""SimCLR augmentations in pure jnp, applied on device with one key per example.

Each function takes one image [H, W, C] float32 in [0, 1] and a key; `two_views` vmaps the
recipe over a batch. The recipe (Chen et al. 2020, appendix A) is: random resized crop +
horizontal flip, colour jitter with probability p (brightness, contrast, and for C = 3 also
saturation and hue, in random order), random grayscale (C = 3), optional Gaussian blur. On
one channel colour jitter degrades to brightness/contrast jitter.
"""

import jax
import jax.numpy as jnp


def random_resized_crop(key, image, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Crops a random area fraction in `scale` with aspect ratio in `ratio`; resizes to H x W.

  Sampling as torchvision's RandomResizedCrop, without its rejection loop: the crop size is
  clipped to the image, so every draw is valid. Resampling is bilinear with antialiasing.
  """
  h, w = image.shape[:2]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  r = jnp.exp(log_r)
  crop_h = jnp.clip(jnp.sqrt(area / r), 1.0 / h, 1.0) * h
  crop_w = jnp.clip(jnp.sqrt(area * r), 1.0 / w, 1.0) * w
  y0 = jax.random.uniform(k_y, ()) * (h - crop_h)
  x0 = jax.random.uniform(k_x, ()) * (w - crop_w)
  scale_yx = jnp.stack([h / crop_h, w / crop_w])
  # Output pixel o samples input (o + 0.5) / scale - 0.5 + offset: translation = -offset * scale.
  translation = -jnp.stack([y0, x0]) * scale_yx
  return jax.image.scale_and_translate(
      image, image.shape, (0, 1), scale_yx, translation, method='linear', antialias=True)


def random_flip(key, image):
  """Flips left-right with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def _gray(image):
  """Luma [H, W, 1] (ITU-R 601) of an RGB image, or the image itself if C = 1."""
  if image.shape[-1] == 1:
    return image
  return image @ jnp.array([0.299, 0.587, 0.114])[:, None]


def _hue_rotate(image, angle):
  """Rotates the hue of an RGB image by `angle` radians in YIQ space."""
  to_yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  c, s = jnp.cos(angle), jnp.sin(angle)
  rot = jnp.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
  return image @ (jnp.linalg.inv(to_yiq) @ rot @ to_yiq).T


def color_jitter(key, image, *, brightness, contrast, saturation, hue):
  """Random brightness, contrast (and on RGB saturation, hue) factors, applied in random order.

  brightness: x * f, f ~ U[1 - b, 1 + b]; contrast: blend with the mean gray level,
  f ~ U[1 - c, 1 + c]; saturation: blend with the gray image; hue: rotation by
  U[-h, h] * 2 pi. Ops that need colour are skipped on a single channel.
  """
  keys = jax.random.split(key, 5)
  f = lambda k, m: jax.random.uniform(k, (), minval=1 - m, maxval=1 + m)
  fb, fc, fs = f(keys[0], brightness), f(keys[1], contrast), f(keys[2], saturation)
  angle = jax.random.uniform(keys[3], (), minval=-hue, maxval=hue) * 2 * jnp.pi
  ops = [lambda x: x * fb, lambda x: (x - jnp.mean(_gray(x))) * fc + jnp.mean(_gray(x))]
  if image.shape[-1] == 3:
    ops += [lambda x: (x - _gray(x)) * fs + _gray(x), lambda x: _hue_rotate(x, angle)]
  order = jax.random.permutation(keys[4], len(ops))
  for i in range(len(ops)):  # a static unroll over the (2 or 4) ops, not over examples
    image = jnp.clip(jax.lax.switch(order[i], ops, image), 0.0, 1.0)
  return image


def gaussian_blur(key, image, *, sigma=(0.1, 2.0), kernel_frac=0.1):
  """Separable Gaussian blur, sigma ~ U[sigma], kernel ~ kernel_frac of the side (odd, >= 3)."""
  size = max(3, int(round(kernel_frac * image.shape[0])) // 2 * 2 + 1)
  s = jax.random.uniform(key, (), minval=sigma[0], maxval=sigma[1])
  t = jnp.arange(size, dtype=image.dtype) - size // 2
  k = jnp.exp(-0.5 * (t / s) ** 2)
  k = k / jnp.sum(k)
  pad = size // 2
  x = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode='reflect')
  windows_h = jnp.stack([x[i:i + image.shape[0]] for i in range(size)])  # (size, H, W+2p, C)
  x = jnp.tensordot(k, windows_h, axes=1)
  windows_w = jnp.stack([x[:, i:i + image.shape[1]] for i in range(size)])  # (size, H, W, C)
  return jnp.tensordot(k, windows_w, axes=1)


def line_drawing(image, *, gain=8.0):
  """The image's edges as dark lines on white, like a monochrome glyph: 1 - gain |Sobel(luma)|,
  clipped to [0, 1], in every channel."""
  x = jnp.pad(_gray(image)[..., 0], 1, mode='edge')
  gx = (x[:-2, 2:] + 2 * x[1:-1, 2:] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[1:-1, :-2] + x[2:, :-2])
  gy = (x[2:, :-2] + 2 * x[2:, 1:-1] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[:-2, 1:-1] + x[:-2, 2:])
  lines = jnp.clip(1.0 - gain / 8 * jnp.sqrt(gx**2 + gy**2), 0.0, 1.0)  # no gradient taken
  return jnp.broadcast_to(lines[..., None], image.shape)


def _maybe(key, p, fn, image):
  """Applies fn(image) with probability p."""
  return jnp.where(jax.random.bernoulli(key, p), fn(image), image)


def simclr_view(key, image, cfg):
  """One augmented view of image [H, W, C] uint8 -> float32 in [0, 1], per config `cfg`.

  cfg fields: crop_scale (min, max), flip (bool), jitter_prob, brightness, contrast,
  saturation, hue, gray_prob (RGB only), blur_prob.
  """
  keys = jax.random.split(key, 7)
  x = to_float(image)
  x = random_resized_crop(keys[0], x, scale=tuple(cfg.crop_scale))
  if cfg.flip:
    x = random_flip(keys[1], x)
  jitter = lambda y: color_jitter(keys[3], y, brightness=cfg.brightness, contrast=cfg.contrast,
                                  saturation=cfg.saturation, hue=cfg.hue)
  x = _maybe(keys[2], cfg.jitter_prob, jitter, x)
  if x.shape[-1] == 3 and cfg.gray_prob > 0:
    x = _maybe(keys[4], cfg.gray_prob, lambda y: jnp.broadcast_to(_gray(y), y.shape), x)
  if cfg.blur_prob > 0:
    x = _maybe(keys[5], cfg.blur_prob, lambda y: gaussian_blur(keys[6], y), x)
  return jnp.clip(x, 0.0, 1.0)


def two_views(rng, images, cfg, indices=None):
  """Two independent views of each image: images [B, H, W, C] uint8 -> 2 x [B, H, W, C] float32.

  Example b's keys are fold_in(rng, b) split in two, so a view depends only on (rng, b), not on
  how the batch is sharded. `indices` ([B] int, default arange(B)) are the rows' numbers in the
  global batch when `images` is a part of it (GradCache's micro-batches replay the same views).
  """
  indices = jnp.arange(images.shape[0]) if indices is None else indices
  example_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)
  view_keys = jax.vmap(lambda k: jax.random.split(k, 2))(example_keys)  # (B, 2) keys
  view = jax.vmap(lambda k, im: simclr_view(k, im, cfg))
  return view(view_keys[:, 0], images), view(view_keys[:, 1], images)


def one_view(rng, images, cfg, indices=None):
  """One augmented view of each image (`simclr_view`, then with probability cfg.sketch_prob
  `line_drawing`): [B, H, W, C] uint8 -> float32 in [0, 1].

  Example b's key is fold_in(rng, indices[b]) (default b), as in `two_views`: a view depends only
  on (rng, its row's number in the global batch).
  """
  indices = jnp.arange(images.shape[0]) if indices is None else indices
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)
  sketch = cfg.get('sketch_prob', 0.0)

  def view(key, image):
    x = simclr_view(key, image, cfg)
    if sketch > 0:
      x = _maybe(jax.random.fold_in(key, 1), sketch, line_drawing, x)
    return x

  return jax.vmap(view)(keys, images)


def center_view(images):
  """The un-augmented input the encoder sees at evaluation: uint8 -> float32 in [0, 1]."""
  return to_float(images)


def to_float(images):
  """uint8 -> [0, 1] in the default float dtype: float32, or float64 where jax_enable_x64 is on
  (`config.dtype='float64'`, the reference precision the device-count tests compare in)."""
  return images.astype(jnp.result_type(float)) / 255.0
