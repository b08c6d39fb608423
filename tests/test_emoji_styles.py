"""Cross-style emoji (contrastive/data/emoji_styles.py) and the two-tower image augmentation
(contrastive/recipes/two_tower_augment.py)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastive import objectives
from contrastive import two_tower_eval
from contrastive.config_lib import ConfigError
from contrastive.data import augment
from contrastive.data import emoji
from contrastive.data import emoji_styles
from contrastive.data import pairs
from contrastive.data.fashion_mnist import MissingDatasetError
from contrastive.recipes import two_tower_augment

needs_fonts = pytest.mark.skipif(
    not (os.path.exists(emoji_styles.SYMBOLA_PATH) and os.path.exists(emoji.FONT_PATH)),
    reason='make install (Debian fonts-symbola, fonts-noto-color-emoji etc.)')


@needs_fonts
def test_render_glyphs_black_on_white_centred_and_missing_glyphs_detected():
  texts = ['\U0001F40C', '\U0010FFFD', ' ', '\u2602']  # snail, .notdef, empty, umbrella
  images, drawn = emoji_styles.render_glyphs(texts, 32)
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
    assert abs(extent - emoji_styles.FILL * 32) <= 2  # scaled as Noto's art
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
                                          font_path=emoji_styles.DEJAVU_PATH)
  assert 0 < len(dejavu['group']) < len(test['group'])  # a text font: fewer


def test_missing_font_names_the_debian_package(monkeypatch, capsys):
  monkeypatch.setitem(emoji_styles.FONT_PACKAGES, '/nowhere/Symbola.ttf', 'fonts-symbola')
  with pytest.raises(MissingDatasetError, match='apt-get install fonts-symbola'):
    emoji_styles.cross_style_split(font_path='/nowhere/Symbola.ttf')
  with pytest.raises(MissingDatasetError, match='fonts-symbola and fonts-dejavu-core'):
    emoji_styles.check_font('/nowhere/Other.ttf')
  monkeypatch.setattr(emoji_styles, 'SYMBOLA_PATH', '/nowhere/Symbola.ttf')
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
