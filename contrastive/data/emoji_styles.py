"""Emoji drawn in another style: monochrome glyphs of a second font, for cross-style evaluation.

The emoji recipes train on Noto Color Emoji renders (contrastive/data/emoji.py). This module
draws the same split's emoji from a monochrome outline font, black on white, centred and scaled
like the Noto renders, with the same 9 group labels, so a zero-shot evaluation can tell how much
of what a model learned is the training font's style:

  - `fonts-symbola`: /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf (the default;
    148 of the 230 held-out distinct emoji);
  - `fonts-dejavu-core`: /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf (30 of them).

    split = cross_style_split('test', image_size=32)   # MissingDatasetError without the font
    split['image']: [N, 32, 32, 3] uint8; 'group', 'emoji_id': [N] int32 (emoji_id and group as
    EmojiCldr's records); 'emoji': N sequences; 'num_distinct': the split's distinct emoji

An emoji is drawn if it is one code point (U+FE0F and skin tones dropped: flags, keycaps and
ZWJ sequences come out of a font without emoji ligatures as several glyphs) that the font has:
a draw that is empty or identical to the font's .notdef glyph is a missing one.
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from contrastive.data import emoji
from contrastive.data import pairs
from contrastive.data.fashion_mnist import MissingDatasetError

SYMBOLA_PATH = '/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf'
DEJAVU_PATH = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'
FONT_PACKAGES = {SYMBOLA_PATH: 'fonts-symbola', DEJAVU_PATH: 'fonts-dejavu-core'}
FONT_SIZE = 128  # pixels per em of the drawing, before it is scaled to the image size
# The ink's longer side over the image side: the median Noto render's art spans 0.886 of it
# (10th to 90th percentile 0.86 to 0.93, every 20th distinct emoji).
FILL = 120 / 136
_NOT_A_CHARACTER = '\U0010fffd'  # private use, in no emoji font: draws .notdef


def check_font(font_path=SYMBOLA_PATH):
  """The font's path; raises MissingDatasetError (one line naming the Debian package)."""
  if not os.path.isfile(font_path):
    package = FONT_PACKAGES.get(font_path)
    raise MissingDatasetError(
        f'Cross-style emoji font {font_path!r} not found: ' +
        (f'install the Debian package `{package}` (apt-get install {package}).' if package else
         'the Debian packages fonts-symbola and fonts-dejavu-core hold the default fonts.'))
  return font_path


def _ink(font, text):
  """text drawn in white on black: [H, W] uint8 of a 2 x 1.5 em canvas."""
  canvas = Image.new('L', (2 * FONT_SIZE, 3 * FONT_SIZE // 2), 0)
  ImageDraw.Draw(canvas).text((FONT_SIZE // 4, FONT_SIZE // 8), text, font=font, fill=255)
  return np.asarray(canvas)


def render_glyphs(texts, size, *, font_path=SYMBOLA_PATH):
  """Draws each text with the font, black on white, its ink centred and scaled to FILL.

  Returns:
    (images [N, size, size, 3] uint8, drawn [N] bool): drawn is False (and the image white)
    where the font has no glyph: an empty draw or the .notdef glyph's.
  """
  font = ImageFont.truetype(check_font(font_path), FONT_SIZE)
  notdef = _ink(font, _NOT_A_CHARACTER)
  images = np.full((len(texts), size, size, 3), 255, np.uint8)
  drawn = np.zeros(len(texts), bool)
  for i, text in enumerate(texts):
    ink = _ink(font, text)
    if not ink.any() or np.array_equal(ink, notdef):
      continue
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    glyph = Image.fromarray(255 - ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    side = math.ceil(max(glyph.size) / FILL)
    square = Image.new('L', (side, side), 255)
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    picture = square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    images[i], drawn[i] = np.asarray(picture)[..., None], True
  return images, drawn


def cross_style_split(split='test', *, image_size=32, test_fraction=0.125, max_emoji=0,
                      font_path=SYMBOLA_PATH, emoji_test_path=emoji.EMOJI_TEST_PATH):
  """The distinct emoji of EmojiCldr's `split` ('train' | 'test'; the same test_fraction and
  max_emoji subset) that the font draws, one image each (see the module doc).

  Returns:
    {'image': [N, S, S, 3] uint8, 'group': [N] int32, 'emoji_id': [N] int32, 'emoji': [N]
    str (the single code point drawn), 'sequence': [N] str (its fully-qualified form, as
    `emoji.render` draws it), 'num_distinct': int (the split's distinct emoji)}.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r}: choose 'train' or 'test'.")
  check_font(font_path)
  everything, *_ = emoji.read_emoji_test(emoji_test_path)
  first = {}  # distinct emoji (base) -> its first fully-qualified form, as EmojiCldr's ids
  for e in everything:
    first.setdefault(e.base, e)
  stride = math.ceil(len(first) / max_emoji) if max_emoji else 1
  chosen = [(i, e) for i, e in enumerate(first.values()) if i % stride == 0 and
            pairs.in_test_split(e.base, test_fraction) == (split == 'test')]
  single = [(i, e) for i, e in chosen if len(e.base) == 1]
  images, drawn = render_glyphs([e.base for _, e in single], image_size, font_path=font_path)
  kept = [pair for pair, ok in zip(single, drawn) if ok]
  return {'image': images[drawn],
          'group': np.array([e.group for _, e in kept], np.int32),
          'emoji_id': np.array([i for i, _ in kept], np.int32),
          'emoji': [e.base for _, e in kept],
          'sequence': [e.sequence for _, e in kept],
          'num_distinct': len(chosen)}
