"""Encoded image bytes -> a [S, S, 3] uint8 crop: what the web-scale pipeline's workers do per
sample (contrastive/data/webdataset.py).

JPEG goes through `simplejpeg` (libjpeg-turbo) with its DCT-domain downscale: the crop box is
chosen first, in the original's pixels, and the decoder scales by the largest factor M/8 that
keeps that box at least S pixels each way, so a 1024 px photo cropped to 224 is decoded at a
quarter of its area. Anything else (PNG, WEBP, CMYK JPEG) goes through Pillow, transparency
over white. The box is then resized to S x S: bilinear as big_vision's crops are, antialiased
(Pillow's `resize(box=)`; half the time of bicubic: benchmarks/input_pipeline.py).

- Training: Inception-style random resized crop (Szegedy et al. 2015; torchvision's
  `RandomResizedCrop` algorithm): area fraction ~ U(scale), log aspect ratio ~ U(log 3/4,
  log 4/3), 10 tries, else the centre crop of the clamped ratio. No flip (captions name left
  and right). open_clip's CLIP default scale is (0.9, 1.0); big_vision's SigLIP resizes the
  whole image (scale (1, 1), ratio (1, 1) here gives the centre square instead).
- Evaluation: resize the short side to S and crop the centre (= the centre square, resized).

A `ValueError` from either decoder (corrupt or truncated data) is `DecodeError`; the loader
skips and counts such samples.
"""

import io
import math

import numpy as np
from PIL import Image
import simplejpeg

BOX_SEARCH_TRIES = 10
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


class DecodeError(ValueError):
  """The bytes are not a decodable image."""


def random_box(height, width, scale, rng, log_ratio=LOG_RATIO):
  """(top, left, h, w) of an Inception-style random crop of a height x width image."""
  area = height * width
  for _ in range(BOX_SEARCH_TRIES):
    target = area * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  ratio = width / height
  lo, hi = math.exp(log_ratio[0]), math.exp(log_ratio[1])
  if ratio < lo:
    w, h = width, int(round(width / lo))
  elif ratio > hi:
    h, w = height, int(round(height * hi))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def centre_box(height, width):
  """(top, left, h, w) of the centre square: the short side resized to S then centre-cropped."""
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def _is_jpeg(data):
  return data[:3] == b'\xff\xd8\xff'


def _pillow(data):
  """Pillow's decode -> RGB array (transparency composited over white)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode in ('RGBA', 'LA', 'P', 'PA') or 'transparency' in im.info:
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, im).convert('RGB'))
      return np.asarray(im.convert('RGB'))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DecodeError(f'{type(e).__name__}: {e}') from None


def _size(data):
  """(height, width) without decoding the pixels."""
  if _is_jpeg(data):
    try:
      height, width, _, _ = simplejpeg.decode_jpeg_header(data)
      return height, width
    except ValueError:
      pass
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.height, im.width
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DecodeError(f'{type(e).__name__}: {e}') from None


def _decode_at_least(data, min_height, min_width):
  """RGB array of at least (min_height, min_width) where the JPEG decoder can downscale, else
  full size."""
  if _is_jpeg(data):
    try:
      return simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=min_height,
                                    min_width=min_width)
    except ValueError:
      pass  # CMYK, corrupt or truncated: Pillow decides
  return _pillow(data)


def crop(data, size, *, scale=None, rng=None):
  """Encoded image -> [size, size, 3] uint8: a random resized crop with `scale` (a (min, max)
  area fraction) and `rng` (np.random.Generator), or with scale None the centre crop."""
  height, width = _size(data)
  if height < 1 or width < 1:
    raise DecodeError(f'empty image ({height} x {width}).')
  top, left, h, w = (random_box(height, width, scale, rng) if scale is not None
                     else centre_box(height, width))
  image = _decode_at_least(data, math.ceil(size * height / h), math.ceil(size * width / w))
  if image.ndim != 3 or image.shape[2] != 3:
    raise DecodeError(f'decoded to shape {image.shape}, not [H, W, 3].')
  fy, fx = image.shape[0] / height, image.shape[1] / width  # the decoder's downscale
  box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
  out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(out, np.uint8)
