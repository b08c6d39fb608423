"""On-device augmentations: determinism, per-example keys, ranges and the identity cases."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive.data import augment


def _cfg(**overrides):
  cfg = dict(crop_scale=(0.2, 1.0), flip=True, jitter_prob=0.8, brightness=0.4, contrast=0.4,
             saturation=0.4, hue=0.1, gray_prob=0.2, blur_prob=0.5)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _images(n=16, size=28, channels=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope='module')
def views_fn():
  return jax.jit(lambda rng, x: augment.two_views(rng, x, _cfg()))


def test_same_key_same_views_different_key_different_views(views_fn):
  x = _images()
  a1, b1 = views_fn(jax.random.key(0), x)
  a2, b2 = views_fn(jax.random.key(0), x)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  a3, _ = views_fn(jax.random.key(1), x)
  assert not np.allclose(a1, a3)
  assert not np.allclose(a1, b1)  # the two views of an image differ


def test_view_depends_only_on_key_and_example_index(views_fn):
  """Example b's view is the same whatever the other rows hold (no cross-example coupling)."""
  x = _images()
  y = x.copy()
  y[1:] = _images(seed=5)[1:]
  np.testing.assert_array_equal(views_fn(jax.random.key(3), x)[0][0],
                                views_fn(jax.random.key(3), y)[0][0])


@pytest.mark.parametrize('channels', [1, 3])
def test_output_shape_dtype_and_range(channels):
  x = _images(channels=channels, size=32)
  a, b = jax.jit(lambda r, x: augment.two_views(r, x, _cfg()))(jax.random.key(0), x)
  assert a.shape == b.shape == x.shape and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_full_crop_is_identity():
  im = jnp.asarray(_images(1)[0], jnp.float32) / 255
  out = augment.random_resized_crop(jax.random.key(0), im, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  np.testing.assert_allclose(out, im, atol=1e-6)


def test_crop_zooms_in():
  """A crop of a quarter of the area of a left-dark/right-bright image shows the edge magnified."""
  im = jnp.zeros((28, 28, 1)).at[:, 14:].set(1.0)
  outs = jax.vmap(lambda k: augment.random_resized_crop(k, im, scale=(0.25, 0.25),
                                                        ratio=(1.0, 1.0)))(
      jax.random.split(jax.random.key(0), 64))
  # Whole-image crops have mean 0.5 exactly; a 14x14 crop at a random place has mean != 0.5
  # for almost every draw.
  means = np.asarray(outs.mean(axis=(1, 2, 3)))
  assert np.mean(np.abs(means - 0.5) > 0.05) > 0.5


def test_flip_and_no_flip_both_occur():
  im = jnp.arange(28 * 28, dtype=jnp.float32).reshape(28, 28, 1)
  outs = jax.vmap(lambda k: augment.random_flip(k, im))(jax.random.split(jax.random.key(0), 32))
  flipped = np.array([np.array_equal(o, im[:, ::-1]) for o in np.asarray(outs)])
  kept = np.array([np.array_equal(o, im) for o in np.asarray(outs)])
  assert flipped.any() and kept.any() and np.all(flipped | kept)


def test_gray_jitter_changes_brightness_and_contrast_only():
  im = jnp.asarray(_images(1)[0], jnp.float32) / 255
  out = augment.color_jitter(jax.random.key(2), im, brightness=0.4, contrast=0.4,
                             saturation=0.4, hue=0.1)
  assert out.shape == im.shape
  # A brightness/contrast change is an affine map of the pixel values (before clipping).
  inside = (out > 0.01) & (out < 0.99)
  slope, intercept = np.polyfit(np.asarray(im)[inside], np.asarray(out)[inside], 1)
  np.testing.assert_allclose(np.asarray(out)[inside], slope * np.asarray(im)[inside] + intercept,
                             atol=1e-4)


def test_blur_preserves_constant_image_and_smooths():
  const = jnp.full((28, 28, 1), 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(jax.random.key(0), const), const, atol=1e-6)
  noise = jnp.asarray(np.random.default_rng(0).random((28, 28, 1)), jnp.float32)
  blurred = augment.gaussian_blur(jax.random.key(0), noise, sigma=(1.5, 1.5))
  assert float(jnp.std(blurred)) < 0.7 * float(jnp.std(noise))
