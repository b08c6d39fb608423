"""Cross-style emoji (contrastive/data/emoji_styles.py) and the two-tower image augmentation
(contrastive/recipes/two_tower_augment.py)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import config_lib
from contrastive import objectives
from contrastive import two_tower_eval
from contrastive.config_lib import ConfigError
from contrastive.data import augment
from contrastive.data import emoji
from contrastive.data import emoji_styles
from contrastive.data import glyphs
from contrastive.data import pair_batches
from contrastive.data import pairs
from contrastive.data.fashion_mnist import MissingDatasetError
from contrastive.recipes import two_tower_augment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fonts = pytest.mark.skipif(
    not (os.path.exists(glyphs.SYMBOLA_PATH) and os.path.exists(emoji.FONT_PATH)),
    reason='make install (Debian fonts-symbola, fonts-noto-color-emoji etc.)')


@needs_fonts
def test_render_glyphs_black_on_white_centred_and_missing_glyphs_detected():
  texts = ['\U0001F40C', '\U0010FFFD', ' ', '\u2602']  # snail, .notdef, empty, umbrella
  images, drawn = glyphs.render_glyphs(texts, 32)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(drawn, [True, False, False, True])
  assert (images[~drawn] == 255).all()  # a missing glyph: white, and left out by the split
  for image in images[drawn]:
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image[0].min() >= 245 and image[:, 0].min() >= 245  # white margins
    assert image.min() < 40  # black ink
    ink = image[..., 0] < 128
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    assert abs(extent - glyphs.FILL * 32) <= 2  # scaled as Noto's art
    centre = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)
    np.testing.assert_allclose(centre, 15.5, atol=1.5)


@pytest.fixture(scope='module')
def noto_test_split(tmp_path_factory):
  builder = emoji.EmojiCldr(data_dir=tmp_path_factory.mktemp('tfds'), image_size=32,
                            max_emoji=300)
  split = pairs.load_split(builder, 'test')
  return [split[i] for i in range(len(split))]


@needs_fonts
def test_cross_style_split_labels_equal_the_noto_ones(noto_test_split):
  drawn = emoji_styles.cross_style_split('test', image_size=32, max_emoji=300)
  noto_group = {int(r['emoji_id']): int(r['group']) for r in noto_test_split}
  assert drawn['num_distinct'] == len(noto_group)  # the builder's held-out emoji, no others
  assert 0 < len(drawn['group']) < len(noto_group)
  for emoji_id, group, char in zip(drawn['emoji_id'], drawn['group'], drawn['emoji']):
    assert noto_group[int(emoji_id)] == group, char
  assert len(set(drawn['emoji_id'].tolist())) == len(drawn['emoji_id'])  # one image each
  assert drawn['image'].shape == (len(drawn['group']), 32, 32, 3)


@needs_fonts
def test_cross_style_coverage_of_the_held_out_emoji():
  test = emoji_styles.cross_style_split('test', image_size=32)
  train = emoji_styles.cross_style_split('train', image_size=32)
  assert 200 <= test['num_distinct'] <= 260  # 230 of 1,876 distinct emoji (Unicode 15.0)
  # Symbola draws the held-out emoji that are one code point (148 of 230): not the flags, skin
  # tones and ZWJ sequences; every group has some.
  assert 0.55 <= len(test['group']) / test['num_distinct'] <= 0.75
  assert set(test['group'].tolist()) == set(range(9))
  assert not set(test['emoji_id'].tolist()) & set(train['emoji_id'].tolist())
  assert all(len(c) == 1 for c in test['emoji'])
  dejavu = emoji_styles.cross_style_split('test', image_size=32,
                                          font_path=glyphs.DEJAVU_PATH)
  assert 0 < len(dejavu['group']) < len(test['group'])  # a text font: fewer


needs_style_fonts = pytest.mark.skipif(
    not all(os.path.exists(p) for paths in glyphs.TRAINING_STYLES.values() for p in paths),
    reason='make install (Debian fonts-unifont, fonts-noto-core)')


def _records(builder, split):
  data = pairs.load_split(builder, split)
  return [data[i] for i in range(len(data))]


@needs_fonts
@needs_style_fonts
def test_training_styles_add_monochrome_training_emoji_and_leave_the_test_split(tmp_path):
  plain = emoji.EmojiCldr(data_dir=tmp_path, image_size=32, max_emoji=300)
  styled = emoji.EmojiCldr(data_dir=tmp_path, image_size=32, max_emoji=300,
                           styles=('unifont', 'noto_symbols'))
  key = lambda r: (int(r['image_id']), r['text'])
  plain_test = {key(r): r['image'] for r in _records(plain, 'test')}
  styled_test = {key(r): r['image'] for r in _records(styled, 'test')}
  assert plain_test.keys() == styled_test.keys()  # the same held-out rows
  for k, image in plain_test.items():
    np.testing.assert_array_equal(image, styled_test[k])
  base, train = _records(plain, 'train'), _records(styled, 'train')
  base_keys = {key(r) for r in base}
  assert base_keys <= {key(r) for r in train}  # every Noto row, and rows of the styles
  extra = [r for r in train if key(r) not in base_keys]
  assert len(extra) == len(train) - len(base)
  num_emoji = len(emoji.read_emoji_test()[0])
  style_of = {int(r['image_id']) // num_emoji for r in extra}
  assert style_of == {1, 2}  # image_id = (1 + style) * len(emoji) + the first variant's index
  counts = styled.info.metadata['styled_images']
  assert counts == {name: len({int(r['image_id']) for r in extra
                               if int(r['image_id']) // num_emoji == 1 + s})
                    for s, name in enumerate(('unifont', 'noto_symbols'))}
  assert counts['unifont'] > counts['noto_symbols'] > 0
  texts = {}  # each emoji's texts, as its Noto rows (its first variant) carry them
  for r in base:
    texts.setdefault(int(r['emoji_id']), {}).setdefault(int(r['image_id']), set()).add(r['text'])
  test_ids = {int(r['emoji_id']) for r in _records(plain, 'test')}
  by_image = {}
  for r in extra:
    image = r['image']
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image.min() < 80 and image[0].min() >= 245  # dark ink, white margin
    assert int(r['emoji_id']) not in test_ids
    by_image.setdefault(int(r['image_id']), set()).add(r['text'])
  for image_id, image_texts in by_image.items():
    first = image_id % num_emoji
    assert image_texts == texts[next(int(r['emoji_id']) for r in base
                                     if int(r['image_id']) == first)][first]


def test_unknown_or_missing_training_style_is_one_clear_error(monkeypatch, tmp_path):
  cfg = ml_collections.ConfigDict(dict(name='emoji_cldr', image_size=32, styles=('symbola',)))
  with pytest.raises(ConfigError, match=r"styles: unknown style\(s\) \['symbola'\]"):
    pair_batches.builder(cfg)
  assert pair_batches.emoji_styles(ml_collections.ConfigDict(
      dict(styles='unifont, noto_symbols'))) == ('unifont', 'noto_symbols')
  monkeypatch.setitem(glyphs.TRAINING_STYLES, 'unifont', ('/nowhere/unifont_upper.otf',))
  monkeypatch.setitem(glyphs.FONT_PACKAGES, '/nowhere/unifont_upper.otf', 'fonts-unifont')
  with pytest.raises(MissingDatasetError, match='apt-get install fonts-unifont'):
    emoji.EmojiCldr(data_dir=tmp_path, image_size=32, max_emoji=64, styles=('unifont',))
  assert not list(tmp_path.iterdir())  # refused before any folder


@pytest.mark.parametrize('config', ['siglip_emoji.py', 'clip_emoji.py', 'clip_emoji_wordnet.py'])
def test_styles_variant_sets_the_emoji_datasets_styles(config):
  cfg = config_lib.load_config(os.path.join(REPO, 'configs', config), 'styles')
  fields = cfg.dataset.get('emoji_cldr') or cfg.dataset
  assert pair_batches.emoji_styles(fields) == ('unifont', 'noto_symbols')
  plain = config_lib.load_config(os.path.join(REPO, 'configs', config), '')
  assert pair_batches.emoji_styles(plain.dataset.get('emoji_cldr') or plain.dataset) == ()
  if config == 'siglip_emoji.py':
    assert pair_batches.builder(cfg.dataset).builder_config.name == '32px_en_unifont_noto_symbols'


def test_missing_font_names_the_debian_package(monkeypatch, capsys):
  monkeypatch.setitem(glyphs.FONT_PACKAGES, '/nowhere/Symbola.ttf', 'fonts-symbola')
  with pytest.raises(MissingDatasetError, match='apt-get install fonts-symbola'):
    emoji_styles.cross_style_split(font_path='/nowhere/Symbola.ttf')
  with pytest.raises(MissingDatasetError, match='fonts-symbola and fonts-dejavu-core'):
    glyphs.check_font('/nowhere/Other.ttf')
  monkeypatch.setattr(glyphs, 'SYMBOLA_PATH', '/nowhere/Symbola.ttf')
  cfg = ml_collections.ConfigDict(dict(name='emoji_cldr', image_size=32, max_examples=64))
  assert two_tower_eval.cross_style_sets(cfg, 'test') == {}
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and '`fonts-symbola`' in out[0], out


def _config(**augment):
  return ml_collections.ConfigDict(dict(augment=dict(two_tower_augment.DEFAULTS, **augment)))


def test_augment_off_keeps_the_objective_and_bad_fields_fail():
  objective = objectives.Objective(embed=lambda *a: a, loss=lambda *a: a)
  assert two_tower_augment.settings(_config()) is None
  assert two_tower_augment.settings(ml_collections.ConfigDict()) is None
  assert two_tower_augment.wrap(objective, None) is objective
  with pytest.raises(ConfigError, match='unknown field'):
    two_tower_augment.settings(ml_collections.ConfigDict(dict(augment=dict(grey_prob=0.5))))
  with pytest.raises(ConfigError, match='crop_scale'):
    two_tower_augment.settings(_config(crop_scale=(0.0, 1.0)))
  with pytest.raises(ConfigError, match='gray_prob'):
    two_tower_augment.settings(_config(gray_prob=1.5))


def test_augment_on_changes_training_images_per_row_and_rng():
  objective = objectives.Objective(embed=lambda params, state, rows, rng: rows, loss=None)
  wrapped = two_tower_augment.wrap(objective, two_tower_augment.settings(
      _config(gray_prob=1.0, crop_scale=(0.5, 1.0))))
  embed = jax.jit(lambda rows, rng: wrapped.embed(None, None, rows, rng))
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  tokens = np.arange(20, dtype=np.int32).reshape(4, 5)
  rows = dict(a=images, b=tokens, index=np.arange(4))
  first = embed(rows, jax.random.key(0))
  again, other = embed(rows, jax.random.key(0))['a'], embed(rows, jax.random.key(1))['a']
  tail = embed(dict(a=images[1:], b=tokens[1:], index=np.arange(1, 4)), jax.random.key(0))['a']
  views = np.asarray(first['a'])
  assert views.shape == images.shape and views.dtype == np.float32
  np.testing.assert_array_equal(views, again)
  assert not np.allclose(views, other)
  assert not np.allclose(views, images / 255.0, atol=0.05)
  np.testing.assert_array_equal(views[1:], tail)  # a view depends on its row's number only
  np.testing.assert_allclose(views[..., 0], views[..., 1], atol=1e-6)  # greyscale
  np.testing.assert_array_equal(first['b'], tokens)
  text_rows = dict(a=tokens, b=tokens, index=np.arange(4))  # a text tower a: untouched
  assert wrapped.embed(None, None, text_rows, jax.random.key(0))['a'] is tokens


def test_line_drawing_draws_edges_dark_on_white():
  image = jnp.ones((16, 16, 3)).at[4:12, 4:12].set(jnp.array([1.0, 0.8, 0.0]))  # yellow square
  lines = np.asarray(augment.line_drawing(image))
  assert lines.shape == image.shape
  assert (lines[0] == 1).all() and (lines[8, 8] == 1).all()  # flat areas: white
  assert lines[8, 4, 0] < 0.5 and lines[3, 8, 0] < 0.5  # the square's outline: dark
  np.testing.assert_array_equal(lines[..., 0], lines[..., 2])
