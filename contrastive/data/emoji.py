"""Emoji pictures <-> CLDR names and keywords: an image-text tfds builder (no download, no TensorFlow).

Sources (Debian packages; Unicode data licence, OFL for the font):
  - `fonts-noto-color-emoji`: /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf (one bitmap size, 109);
  - `unicode-data`: /usr/share/unicode/emoji/emoji-test.txt (fully-qualified emoji, 9 groups, 99
    subgroups, in CLDR order);
  - `unicode-cldr-core`: /usr/share/unicode/cldr/common/annotations{,Derived}/<lang>.xml (the name,
    `type="tts"`, and `|`-separated keywords; CLDR writes the sequences without U+FE0F).

One example per (emoji, text) pair, the text being the emoji's name or one of its keywords:

    builder = EmojiCldr(data_dir=tmp, image_size=32)       # languages=('en',) by default
    train = pairs.load_split(builder, 'train')             # converts on first use (~5 s at 32x32)
    train[i] -> {'image': [32, 32, 3] uint8, 'text': bytes, 'emoji_id', 'image_id', 'group',
                 'subgroup', 'language': int32, 'is_name': bool, 'emoji': bytes}

`emoji_id` is the same for the skin-tone variants of one emoji (the "distinct emoji"); the split is by
it, so all variants of one emoji are on one side.

`styles` (glyphs.TRAINING_STYLES: 'unifont', 'noto_symbols') add to the training split each distinct
training emoji that is one code point drawn black on white in that style's monochrome fonts, with the
texts of its first variant and an image_id of its own; the test split stays the Noto renders. The
cross-style evaluation's font (Symbola) is not a training style.

    EmojiCldr(data_dir=tmp, image_size=32, styles=('unifont', 'noto_symbols'))  # + 1,205 + 350 images

Group and subgroup names: `read_emoji_test(path)`, or `builder.info.metadata['groups' |
'subgroups' | 'subgroup_group']`.
"""

import dataclasses
import logging
import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
import tensorflow_datasets as tfds

from contrastive.data import glyphs
from contrastive.data import pairs
from contrastive.data.fashion_mnist import MissingDatasetError

FONT_PATH = '/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf'
EMOJI_TEST_PATH = '/usr/share/unicode/emoji/emoji-test.txt'
CLDR_DIR = '/usr/share/unicode/cldr/common'
DEBIAN_PACKAGES = ('fonts-noto-color-emoji', 'unicode-data', 'unicode-cldr-core')
FONT_SIZE = 109  # Noto Color Emoji's only bitmap strike (136 x 128 pixels)
_GLYPH = 136
BACKGROUND = (255, 255, 255)
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_VS16 = '\ufe0f'
_LINE = re.compile(r'^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.*)$')


@dataclasses.dataclass(frozen=True)
class Emoji:
  """One fully-qualified emoji of emoji-test.txt; `base` drops skin tones and U+FE0F."""
  sequence: str
  name: str
  group: int
  subgroup: int
  base: str


def check_files(*, font_path=FONT_PATH, emoji_test_path=EMOJI_TEST_PATH, cldr_dir=CLDR_DIR,
                languages=('en',)):
  """The source files' paths; raises MissingDatasetError (one line naming the Debian package and
  path) if one is missing."""
  needed = [(font_path, 'fonts-noto-color-emoji'), (emoji_test_path, 'unicode-data')]
  for lang in languages:
    needed += [(os.path.join(cldr_dir, d, f'{lang}.xml'), 'unicode-cldr-core')
               for d in ('annotations', 'annotationsDerived')]
  for path, package in needed:
    if not os.path.isfile(path):
      raise MissingDatasetError(f'Emoji data file {path!r} not found: install the Debian package '
                                f'`{package}` (apt-get install {package}).')
  return [path for path, _ in needed]


def read_emoji_test(path=EMOJI_TEST_PATH):
  """Parses emoji-test.txt.

  Returns:
    (emoji, groups, subgroups, subgroup_group): the fully-qualified emoji in file order, the names of
    the 9 groups and 99 subgroups that hold one (the 'Component' group has none), and [num_subgroups]
    the group index of each subgroup.
  """
  emoji, groups, subgroups, subgroup_group = [], [], [], []
  group = subgroup = None
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.startswith('# group:'):
        group = line.split(':', 1)[1].strip()
      elif line.startswith('# subgroup:'):
        subgroup = line.split(':', 1)[1].strip()
      elif (m := _LINE.match(line)):
        if not groups or groups[-1] != group:
          groups.append(group)
        if not subgroups or subgroups[-1] != subgroup:
          subgroups.append(subgroup)
          subgroup_group.append(len(groups) - 1)
        sequence = ''.join(chr(int(c, 16)) for c in m.group(1).split())
        base = ''.join(c for c in sequence if c not in SKIN_TONES and c != _VS16)
        emoji.append(Emoji(sequence, m.group(2).strip(), len(groups) - 1, len(subgroups) - 1, base))
  return emoji, groups, subgroups, subgroup_group


def read_annotations(cldr_dir, language):
  """CLDR annotations of `language`: {sequence without U+FE0F: (name or None, [keywords])}.

  annotations/<lang>.xml holds single code points, annotationsDerived/<lang>.xml the skin-tone
  variants, ZWJ sequences, flags and keycaps. Entries marked `↑↑↑` (inherit) are skipped.
  """
  out = {}
  for sub in ('annotations', 'annotationsDerived'):
    for node in ET.parse(os.path.join(cldr_dir, sub, f'{language}.xml')).iter('annotation'):
      text = (node.text or '').strip()
      if not text or text == '↑↑↑':
        continue
      name, keywords = out.setdefault(node.get('cp').replace(_VS16, ''), (None, []))
      if node.get('type') == 'tts':
        out[node.get('cp').replace(_VS16, '')] = (text, keywords)
      else:
        keywords.extend(k.strip() for k in text.split('|') if k.strip())
  return out


def emoji_texts(e, annotations, *, fallback_name=True):
  """The texts of emoji `e`: its CLDR name first (or emoji-test's name if CLDR has none and
  `fallback_name`), then its keywords, without duplicates. Returns (texts, index of the name or -1)."""
  name, keywords = annotations.get(e.sequence.replace(_VS16, ''), (None, []))
  if name is None and fallback_name:
    name = e.name
  texts = [name] if name else []
  texts += [k for k in dict.fromkeys(keywords) if k != name]
  return texts, (0 if name else -1)


def render(sequences, size, *, font_path=FONT_PATH, background=BACKGROUND):
  """Renders emoji with Pillow from the colour font, centred on a square, then resized.

  Returns:
    (images [N, size, size, 3] uint8, num_wide): num_wide counts sequences that did not shape into one
    glyph (drawn wider than one em; they are scaled down to fit). 0 with RAQM and the Debian font.
  """
  layout = ImageFont.Layout.RAQM if features.check('raqm') else ImageFont.Layout.BASIC
  if layout == ImageFont.Layout.BASIC:
    logging.warning('Pillow has no RAQM layout (Debian package libfribidi0 missing?): flags, skin '
                    'tones and ZWJ sequences render as several glyphs.')
  font = ImageFont.truetype(font_path, FONT_SIZE, layout_engine=layout)
  images, num_wide = np.empty((len(sequences), size, size, 3), np.uint8), 0
  for i, seq in enumerate(sequences):
    # One em box (136 x 128, centred on a 136 square) on a canvas two glyphs wide: a sequence that
    # did not shape into one glyph spills over and is scaled down to fit (laying the text out only
    # once, not also to measure it).
    canvas = Image.new('RGBA', (2 * _GLYPH, _GLYPH), background + (0,))
    ImageDraw.Draw(canvas).text((0, (_GLYPH - 128) // 2), seq, font=font, embedded_color=True)
    right = (canvas.getbbox() or (0, 0, 0, 0))[2]
    num_wide += right > _GLYPH
    side = max(right, _GLYPH)
    picture = Image.new('RGBA', (side, side), background + (255,))
    picture.alpha_composite(canvas.crop((0, 0, side, _GLYPH)), (0, (side - _GLYPH) // 2))
    images[i] = np.asarray(picture.convert('RGB').resize((size, size), Image.Resampling.LANCZOS,
                                                        reducing_gap=2.0))
  return images, num_wide


@dataclasses.dataclass
class EmojiCldrConfig(tfds.core.BuilderConfig):
  """image_size: S of the [S, S, 3] images; languages: CLDR locales of the texts (index = `language`);
  test_fraction: share of distinct emoji held out; max_emoji: if > 0, an evenly spaced subset of about
  this many distinct emoji (with all their variants), for tests."""
  image_size: int = 32
  languages: tuple[str, ...] = ('en',)
  test_fraction: float = 0.125
  max_emoji: int = 0
  styles: tuple[str, ...] = ()


def _config_name(image_size, languages, max_emoji, styles=()):
  return (f"{image_size}px_{'-'.join(languages)}" + (f'_sub{max_emoji}' if max_emoji else '') +
          ''.join(f'_{s}' for s in styles))


class EmojiCldr(tfds.core.GeneratorBasedBuilder):
  """Noto Color Emoji renders paired with their CLDR names and keywords (train/test by distinct emoji)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Rendered from the Debian font; texts from CLDR annotations.'}
  BUILDER_CONFIGS = [EmojiCldrConfig(name=_config_name(s, ('en',), 0), image_size=s)
                     for s in (32, 64)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'apt-get install {" ".join(DEBIAN_PACKAGES)}'

  def __init__(self, *, image_size=None, languages=None, max_emoji=0, styles=(),
               font_path=FONT_PATH, emoji_test_path=EMOJI_TEST_PATH, cldr_dir=CLDR_DIR, **kwargs):
    if image_size is not None or languages is not None or max_emoji or styles:
      if kwargs.get('config') is not None:
        raise ValueError('Pass either config= or image_size/languages/max_emoji/styles, not both.')
      languages, styles = tuple(languages or ('en',)), tuple(styles)
      for style in styles:
        glyphs.style_fonts(style)  # an unknown style or a missing font: before any folder
      name = _config_name(image_size or 32, languages, max_emoji, styles)
      kwargs['config'] = self.builder_configs.get(name) or EmojiCldrConfig(
          name=name, image_size=image_size or 32, languages=languages, max_emoji=max_emoji,
          styles=styles)
    self._paths = dict(font_path=font_path, emoji_test_path=emoji_test_path, cldr_dir=cldr_dir)
    kwargs.setdefault('file_format', 'array_record')
    with pairs.quiet():  # tfds warns about every config not in BUILDER_CONFIGS
      super().__init__(**kwargs)
    self._original_state.update(self._paths, file_format=kwargs['file_format'])

  def _info(self):
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding='zlib'),
            'text': tfds.features.Text(),
            'emoji': tfds.features.Text(),
            'emoji_id': tfds.features.Scalar(dtype=np.int32),
            'image_id': tfds.features.Scalar(dtype=np.int32),
            'group': tfds.features.Scalar(dtype=np.int32),
            'subgroup': tfds.features.Scalar(dtype=np.int32),
            'language': tfds.features.Scalar(dtype=np.int32),
            'is_name': tfds.features.Scalar(dtype=np.bool_),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage='https://cldr.unicode.org/translation/characters/short-names-and-keywords',
    )

  def download_and_prepare(self, *args, **kwargs):
    if not self.is_prepared():  # before tfds creates any folder
      check_files(languages=self.builder_config.languages, **self._paths)
    return super().download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    check_files(languages=cfg.languages, **self._paths)
    emoji, groups, subgroups, subgroup_group = read_emoji_test(self._paths['emoji_test_path'])
    bases = list(dict.fromkeys(e.base for e in emoji))  # distinct emoji, in file order
    base_id = {b: i for i, b in enumerate(bases)}
    stride = math.ceil(len(bases) / cfg.max_emoji) if cfg.max_emoji else 1
    keep = [i for i, e in enumerate(emoji) if base_id[e.base] % stride == 0]
    images, num_wide = render([emoji[i].sequence for i in keep], cfg.image_size,
                              font_path=self._paths['font_path'])
    annotations = [read_annotations(self._paths['cldr_dir'], lang) for lang in cfg.languages]
    self.info.metadata.update(groups=groups, subgroups=subgroups, subgroup_group=subgroup_group,
                              languages=list(cfg.languages), num_wide_renders=int(num_wide),
                              num_images=len(keep), num_distinct=len(set(emoji[i].base for i in keep)))
    rows = [(i, emoji[i], base_id[emoji[i].base], image) for i, image in zip(keep, images)]
    is_test = {b: pairs.in_test_split(b, cfg.test_fraction) for b in bases}
    styled = self._styled_rows(emoji, keep, base_id, [b for b in bases if not is_test[b]])
    return {split: self._generate_examples(
        [r for r in rows if is_test[r[1].base] == (split == 'test')] +
        (styled if split == 'train' else []), annotations, cfg.languages)
            for split in ('train', 'test')}

  def _styled_rows(self, emoji, keep, base_id, train_bases):
    """Rows (image_id, Emoji, emoji_id, image) of the training emoji drawn in each of
    config.styles (glyphs.TRAINING_STYLES): one image per distinct emoji that is one code point
    the style's fonts have, in the form of its first variant; image_id = (1 + style) * len(emoji)
    + that variant's index. Counts in metadata['styled_images']."""
    first = {}
    for i in keep:
      first.setdefault(emoji[i].base, i)
    chosen = [first[b] for b in train_bases if b in first and len(b) == 1]
    rows, counts = [], {}
    for s, style in enumerate(self.builder_config.styles):
      images, drawn = glyphs.render_glyphs([emoji[i].base for i in chosen],
                                           self.builder_config.image_size,
                                           font_path=glyphs.style_fonts(style))
      rows += [((1 + s) * len(emoji) + i, emoji[i], base_id[emoji[i].base], image)
               for i, image, ok in zip(chosen, images, drawn) if ok]
      counts[style] = int(drawn.sum())
    self.info.metadata['styled_images'] = counts
    return rows

  def _generate_examples(self, rows, annotations, languages):
    for image_id, e, emoji_id, image in rows:
      for lang, table in enumerate(annotations):
        texts, name_index = emoji_texts(e, table, fallback_name=languages[lang] == 'en')
        for k, text in enumerate(texts):
          yield f'{image_id}_{lang}_{k}', {
              'image': image, 'text': text, 'emoji': e.sequence, 'emoji_id': emoji_id,
              'image_id': image_id, 'group': e.group, 'subgroup': e.subgroup, 'language': lang,
              'is_name': k == name_index}
