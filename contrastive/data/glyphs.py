"""Monochrome glyphs of outline fonts, drawn like the Noto Color Emoji renders: black on white,
the ink centred and scaled to the same share of the image.

Two uses: the cross-style evaluation draws held-out emoji in Symbola (`emoji_styles`), and the
emoji builder's `styles` add the training split's emoji drawn in other monochrome fonts
(`TRAINING_STYLES`; Symbola is not one of them, so the evaluation's style stays unseen).

    images, drawn = render_glyphs(['\U0001F40C', '\u2602'], 32)   # Symbola by default
    images: [N, 32, 32, 3] uint8; drawn: [N] bool (False: no font of the list has the glyph)

Fonts (Debian packages):
  - `fonts-symbola`: Symbola (the cross-style evaluation's font);
  - `fonts-dejavu-core`: DejaVu Sans;
  - `fonts-unifont`: GNU Unifont, 16 x 16 pixel art (the training style 'unifont');
  - `fonts-noto-core`: Noto Sans Symbols 2 and Noto Sans Symbols (the training style
    'noto_symbols').
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from contrastive.data.fashion_mnist import MissingDatasetError

SYMBOLA_PATH = '/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf'
DEJAVU_PATH = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'
UNIFONT_PATHS = ('/usr/share/fonts/opentype/unifont/unifont_upper.otf',  # planes 1-2
                 '/usr/share/fonts/opentype/unifont/unifont.otf')  # plane 0
NOTO_SYMBOLS_PATHS = ('/usr/share/fonts/truetype/noto/NotoSansSymbols2-Regular.ttf',
                      '/usr/share/fonts/truetype/noto/NotoSansSymbols-Regular.ttf')
FONT_PACKAGES = {SYMBOLA_PATH: 'fonts-symbola', DEJAVU_PATH: 'fonts-dejavu-core',
                 **{p: 'fonts-unifont' for p in UNIFONT_PATHS},
                 **{p: 'fonts-noto-core' for p in NOTO_SYMBOLS_PATHS}}
# Training styles of the emoji builder: name -> fonts, each emoji from the first that has it.
TRAINING_STYLES = {'unifont': UNIFONT_PATHS, 'noto_symbols': NOTO_SYMBOLS_PATHS}
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
        f'Emoji style font {font_path!r} not found: ' +
        (f'install the Debian package `{package}` (apt-get install {package}).' if package else
         'the Debian packages fonts-symbola and fonts-dejavu-core hold the default fonts.'))
  return font_path


def check_styles(names):
  """names, each a TRAINING_STYLES key; ValueError naming the unknown ones and the choices."""
  unknown = [n for n in names if n not in TRAINING_STYLES]
  if unknown:
    raise ValueError(f'unknown style(s) {unknown}; choose from {sorted(TRAINING_STYLES)} '
                     '(Symbola draws the cross-style evaluation, so it is not a training style).')
  return names


def style_fonts(name):
  """The font paths of training style `name` (TRAINING_STYLES), each checked (check_font);
  ValueError (check_styles) for another name."""
  check_styles([name])
  return tuple(check_font(p) for p in TRAINING_STYLES[name])


def _ink(font, text):
  """text drawn in white on black: [H, W] uint8 of a 2 x 1.5 em canvas."""
  canvas = Image.new('L', (2 * FONT_SIZE, 3 * FONT_SIZE // 2), 0)
  ImageDraw.Draw(canvas).text((FONT_SIZE // 4, FONT_SIZE // 8), text, font=font, fill=255)
  return np.asarray(canvas)


def _picture(ink, size):
  """ink [H, W] (white on black) -> [size, size] uint8: black on white, centred, scaled to FILL."""
  rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
  glyph = Image.fromarray(255 - ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
  side = math.ceil(max(glyph.size) / FILL)
  square = Image.new('L', (side, side), 255)
  square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
  return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0))


def render_glyphs(texts, size, *, font_path=SYMBOLA_PATH):
  """Draws each text black on white, its ink centred and scaled to FILL, with the font (or the
  first of a tuple of fonts) that has its glyph.

  Returns:
    (images [N, size, size, 3] uint8, drawn [N] bool): drawn is False (and the image white)
    where no font has the glyph: an empty draw or the font's .notdef glyph.
  """
  paths = (font_path,) if isinstance(font_path, str) else tuple(font_path)
  images = np.full((len(texts), size, size, 3), 255, np.uint8)
  drawn = np.zeros(len(texts), bool)
  for path in paths:
    font = ImageFont.truetype(check_font(path), FONT_SIZE)
    notdef = _ink(font, _NOT_A_CHARACTER)
    for i in np.flatnonzero(~drawn):
      ink = _ink(font, texts[i])
      if ink.any() and not np.array_equal(ink, notdef):
        images[i], drawn[i] = _picture(ink, size)[..., None], True
  return images, drawn
