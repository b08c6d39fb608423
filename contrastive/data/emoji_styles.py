"""Emoji drawn in another style: monochrome glyphs of a second font, for cross-style evaluation.

The emoji recipes train on Noto Color Emoji renders (contrastive/data/emoji.py). This module
draws the same split's emoji from a monochrome outline font (`glyphs.render_glyphs`: black on
white, centred and scaled like the Noto renders), with the same 9 group labels, so a zero-shot
evaluation can tell how much of what a model learned is the training font's style:

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

import numpy as np

from contrastive.data import emoji
from contrastive.data import glyphs
from contrastive.data import pairs


def cross_style_split(split='test', *, image_size=32, test_fraction=0.125, max_emoji=0,
                      font_path=glyphs.SYMBOLA_PATH, emoji_test_path=emoji.EMOJI_TEST_PATH):
  """The distinct emoji of EmojiCldr's `split` ('train' | 'test'; the same test_fraction and
  max_emoji subset) that the font draws, one image each (see the module doc).

  Returns:
    {'image': [N, S, S, 3] uint8, 'group': [N] int32, 'emoji_id': [N] int32, 'emoji': [N]
    str (the single code point drawn), 'sequence': [N] str (its fully-qualified form, as
    `emoji.render` draws it), 'num_distinct': int (the split's distinct emoji)}.
  """
  if split not in ('train', 'test'):
    raise ValueError(f"split={split!r}: choose 'train' or 'test'.")
  glyphs.check_font(font_path)
  everything, *_ = emoji.read_emoji_test(emoji_test_path)
  first = {}  # distinct emoji (base) -> its first fully-qualified form, as EmojiCldr's ids
  for e in everything:
    first.setdefault(e.base, e)
  stride = math.ceil(len(first) / max_emoji) if max_emoji else 1
  chosen = [(i, e) for i, e in enumerate(first.values()) if i % stride == 0 and
            pairs.in_test_split(e.base, test_fraction) == (split == 'test')]
  single = [(i, e) for i, e in chosen if len(e.base) == 1]
  images, drawn = glyphs.render_glyphs([e.base for _, e in single], image_size,
                                       font_path=font_path)
  kept = [pair for pair, ok in zip(single, drawn) if ok]
  return {'image': images[drawn],
          'group': np.array([e.group for _, e in kept], np.int32),
          'emoji_id': np.array([i for i, _ in kept], np.int32),
          'emoji': [e.base for _, e in kept],
          'sequence': [e.sequence for _, e in kept],
          'num_distinct': len(chosen)}
