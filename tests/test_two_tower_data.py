"""The two-tower pair datasets: emoji <-> CLDR texts, WordNet word <-> gloss, JSON-lines pairs.

Parsers run on the real Debian files (CI installs them: Makefile APT_PACKAGES); the builders convert
small evenly spaced subsets into tmp_path, so the module runs in seconds.
"""

import json
import os

import numpy as np
from PIL import Image
import pytest

from contrastive.data import emoji
from contrastive.data import pairs
from contrastive.data import pipeline
from contrastive.data import wordnet
from contrastive.data.fashion_mnist import MissingDatasetError

GROUPS = ('Smileys & Emotion', 'People & Body', 'Animals & Nature', 'Food & Drink',
          'Travel & Places', 'Activities', 'Objects', 'Symbols', 'Flags')


def _records(source):
  return source.__getitems__(range(len(source)))


def _text(value):
  return bytes(value).decode('utf-8')


@pytest.fixture(scope='module')
def emoji_splits(tmp_path_factory):
  builder = emoji.EmojiCldr(data_dir=tmp_path_factory.mktemp('tfds'), image_size=32, max_emoji=120)
  return builder, {s: _records(pairs.load_split(builder, s)) for s in ('train', 'test')}


@pytest.fixture(scope='module')
def wordnet_splits(tmp_path_factory):
  builder = wordnet.WordnetGloss(data_dir=tmp_path_factory.mktemp('tfds'), max_synsets=1500)
  return builder, {s: _records(pairs.load_split(builder, s)) for s in ('train', 'test')}


# --- Emoji ---------------------------------------------------------------------------------------

def test_emoji_test_groups_and_skin_tone_bases():
  all_emoji, groups, subgroups, subgroup_group = emoji.read_emoji_test()
  assert tuple(groups) == GROUPS  # 'Component' holds no fully-qualified emoji
  assert 90 <= len(subgroups) <= 110 and len(subgroup_group) == len(subgroups)
  assert 3500 <= len(all_emoji) <= 4000
  assert {e.group for e in all_emoji} == set(range(9))
  by_sequence = {e.sequence: e for e in all_emoji}
  wave, wave_tone = by_sequence['\U0001F44B'], by_sequence['\U0001F44B\U0001F3FD']
  assert wave.base == wave_tone.base == '\U0001F44B' and wave.name == 'waving hand'
  assert subgroup_group[wave.subgroup] == wave.group == GROUPS.index('People & Body')
  distinct = {e.base for e in all_emoji}
  assert 1800 <= len(distinct) <= 2000
  test_share = np.mean([pairs.in_test_split(b, 0.125) for b in distinct])
  assert 0.10 <= test_share <= 0.15


def test_cldr_texts_name_first_then_keywords():
  table = emoji.read_annotations(emoji.CLDR_DIR, 'en')
  all_emoji = {e.sequence: e for e in emoji.read_emoji_test()[0]}
  texts, name_index = emoji.emoji_texts(all_emoji['\U0001F44B\U0001F3FD'], table)
  assert name_index == 0 and texts[0] == 'waving hand: medium skin tone'
  assert 'wave' in texts and len(set(texts)) == len(texts)
  heart = all_emoji['\u2764\ufe0f']  # CLDR keys drop U+FE0F
  assert emoji.emoji_texts(heart, table)[0][0] == 'red heart'


def test_render_one_glyph_per_sequence():
  sequences = ['\U0001F600', '\U0001F1EB\U0001F1F7',  # grinning face, flag of France
               '\U0001F468\u200d\U0001F469\u200d\U0001F467', '\U0001F44B\U0001F3FF']
  images, num_wide = emoji.render(sequences, 32)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  assert num_wide == 0  # RAQM shapes flags, ZWJ and skin-tone sequences into one glyph each
  assert (images[:, 0, 0] == emoji.BACKGROUND).all()  # corners: background
  assert all((im != 255).any(axis=-1).mean() > 0.3 for im in images)  # the glyph fills the square
  assert len({im.tobytes() for im in images}) == 4


def test_emoji_builder_pairs_and_split(emoji_splits):
  builder, splits = emoji_splits
  meta = builder.info.metadata
  assert tuple(meta['groups']) == GROUPS and len(meta['subgroups']) == len(meta['subgroup_group'])
  train, test = splits['train'], splits['test']
  assert len(train) > 5 * len(test) > 0
  sides = {s: {int(r['emoji_id']) for r in rs} for s, rs in splits.items()}
  assert not sides['train'] & sides['test']  # every variant of an emoji on one side
  records = train + test
  assert len({int(r['image_id']) for r in records}) == meta['num_images']
  assert len(sides['train'] | sides['test']) == meta['num_distinct']
  assert {int(r['group']) for r in records} == set(range(9))  # the subset spans every group
  images, names = {}, {}
  for r in records:
    assert r['image'].shape == (32, 32, 3) and r['image'].dtype == np.uint8
    assert meta['subgroup_group'][int(r['subgroup'])] == int(r['group'])
    image_id = int(r['image_id'])
    assert images.setdefault(image_id, r['image'].tobytes()) == r['image'].tobytes()
    if r['is_name']:
      assert image_id not in names
      names[image_id] = _text(r['text'])
  assert set(names) == set(images)  # one name per image, the rest keywords
  assert builder.info.splits['train'].num_examples == len(train)


def test_emoji_64px_and_config_names(tmp_path):
  builder = emoji.EmojiCldr(data_dir=tmp_path, image_size=64, max_emoji=20)
  assert builder.builder_config.name == '64px_en_sub20'
  assert pairs.load_split(builder, 'train')[0]['image'].shape == (64, 64, 3)
  assert emoji.EmojiCldr(data_dir=tmp_path, image_size=64).builder_config.name == '64px_en'
  assert emoji.EmojiCldr(data_dir=tmp_path).builder_config.image_size == 32  # the default config


def test_emoji_missing_sources_name_package_and_path(tmp_path):
  font = str(tmp_path / 'none' / 'NotoColorEmoji.ttf')
  builder = emoji.EmojiCldr(data_dir=tmp_path / 'tfds', font_path=font)
  with pytest.raises(MissingDatasetError, match='fonts-noto-color-emoji') as e:
    pairs.load_split(builder, 'train')
  assert font in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'tfds' / 'emoji_cldr').exists()  # checked before any work
  with pytest.raises(MissingDatasetError, match='unicode-cldr-core'):
    emoji.check_files(languages=('en', 'xx'))
  with pytest.raises(MissingDatasetError, match='unicode-data'):
    emoji.check_files(emoji_test_path=str(tmp_path / 'emoji-test.txt'))


# --- WordNet -------------------------------------------------------------------------------------

def test_wordnet_parse_line():
  line = ('00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in '
          'abundance; "abounding confidence"; "whiskey galore"  \n')
  s = wordnet.parse_line(line)
  assert (s.offset, s.pos, s.lexname, s.words) == (14358, 's', 0, ('abounding', 'galore'))
  assert s.wnid == 'a00014358' and s.gloss.endswith('"whiskey galore"')
  assert wordnet.definition(s.gloss) == 'existing in abundance'
  verb = wordnet.parse_line('00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 '
                            '* 00005041 v 0000 02 + 02 00 | draw air into, and expel out of, the lungs')
  assert verb.words == ('breathe', 'take a breath', 'respire', 'suspire')
  assert wordnet.LEXNAMES[verb.lexname] == 'verb.body' and len(wordnet.LEXNAMES) == 45


def test_wordnet_files_counts():
  synsets = wordnet.read_synsets()
  assert len(synsets) == 117659
  assert 206000 < sum(len(s.words) for s in synsets) < 208000
  assert {s.lexname for s in synsets} == set(range(45))
  assert len({s.wnid for s in synsets}) == len(synsets)


def test_wordnet_builder_split_by_word(wordnet_splits):
  builder, splits = wordnet_splits
  train, test = splits['train'], splits['test']
  assert len(train) > 5 * len(test) > 0
  words = {s: {_text(r['text_a']).lower() for r in rs} for s, rs in splits.items()}
  assert not words['train'] & words['test']
  gloss_of_synset, gloss_of_id = {}, {}
  for r in train + test:
    word, gloss = _text(r['text_a']), _text(r['text_b'])
    assert '_' not in word and '(' not in word and gloss
    assert gloss_of_synset.setdefault(int(r['synset_id']), gloss) == gloss
    assert gloss_of_id.setdefault(int(r['gloss_id']), gloss) == gloss
    assert 0 <= int(r['lexname']) < 45 and 0 <= int(r['pos']) < 4
    assert _text(r['synset'])[0] == 'nvar'[int(r['pos'])]
  assert len(set(gloss_of_id.values())) == len(gloss_of_id)  # identical glosses share an id
  synset_ids = [int(r['synset_id']) for r in train + test]
  assert len(set(synset_ids)) < len(synset_ids)  # synonyms share a synset: false negatives
  assert builder.info.metadata['lexnames'] == list(wordnet.LEXNAMES)


def test_wordnet_missing_files(tmp_path):
  builder = wordnet.WordnetGloss(data_dir=tmp_path / 'tfds', wordnet_dir=str(tmp_path))
  with pytest.raises(MissingDatasetError, match='wordnet-base') as e:
    pairs.load_split(builder, 'train')
  assert str(tmp_path / 'data.noun') in str(e.value)


# --- JSON-lines pairs ----------------------------------------------------------------------------

def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_jsonl_image_text(tmp_path):
  (tmp_path / 'img').mkdir()
  rng = np.random.default_rng(0)
  records = []
  for i in range(12):
    shape, mode = ((40, 60, 4), 'RGBA') if i % 2 else ((50, 30, 3), 'RGB')
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(tmp_path / 'img' / f'{i}.png')
    path = f'img/{i}.png' if i % 3 else str(tmp_path / 'img' / f'{i}.png')  # relative or absolute
    records.append({'image': path, 'text': f'picture {i} \u732b', 'split': 'test' if i >= 9 else 'train'})
  jsonl = _write_jsonl(tmp_path / 'pairs.jsonl', records)
  builder = pairs.convert_jsonl(jsonl, tmp_path / 'tfds', image_size=16, num_shards=2)
  shards = os.listdir(builder.data_dir)
  assert sum('train.array_record' in f for f in shards) == 2
  train, test = (_records(builder.as_data_source(split=s)) for s in ('train', 'test'))
  assert len(train) == 9 and len(test) == 3
  for r in train + test:
    i = int(r['id'])
    assert _text(r['text']) == f'picture {i} \u732b'
    expected = pairs.load_image(str(tmp_path / 'img' / f'{i}.png'), 16)
    np.testing.assert_array_equal(r['image'], expected)
    assert r['image'].shape == (16, 16, 3) and r['image'].dtype == np.uint8
  other = _write_jsonl(tmp_path / 'other.jsonl', records[:2])
  with pytest.raises(ValueError, match='another data_dir'):
    pairs.load_split(pairs.JsonlPairs(jsonl_path=other, image_size=16, data_dir=tmp_path / 'tfds'),
                     'train')


def test_jsonl_text_text_and_errors(tmp_path):
  jsonl = _write_jsonl(tmp_path / 'tt.jsonl', [{'text_a': f'w{i}', 'text_b': f'gloss {i}'}
                                               for i in range(5)])
  builder = pairs.convert_jsonl(jsonl, tmp_path / 'tfds')
  assert builder.builder_config.kind == 'text_text'
  rows = {s: _records(pairs.load_split(builder, s)) for s in ('train', 'test')}
  assert [_text(r['text_a']) for r in rows['test']] == ['w2']  # no "split" keys: the hash split
  assert sorted((int(r['id']), _text(r['text_a']), _text(r['text_b']))
                for r in rows['train'] + rows['test']) == [(i, f'w{i}', f'gloss {i}')
                                                          for i in range(5)]
  bad = _write_jsonl(tmp_path / 'bad.jsonl', [{'text_a': 'a', 'text_b': 'b'}, {'text_a': 'c'}])
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    pairs.read_jsonl(bad)
  with pytest.raises(MissingDatasetError, match='none.jsonl'):
    pairs.convert_jsonl(str(tmp_path / 'none.jsonl'), tmp_path / 'tfds2', kind='text_text')
  missing_image = _write_jsonl(tmp_path / 'mi.jsonl', [{'image': 'gone.png', 'text': 't'}])
  with pytest.raises(pairs.PairsDataError, match=r'mi.jsonl:1: image .gone.png. not found'):
    pairs.convert_jsonl(missing_image, tmp_path / 'tfds3', image_size=8)


def test_builders_registered_in_pipeline():
  assert pipeline.LOCAL_BUILDERS['emoji_cldr'] is emoji.EmojiCldr
  assert pipeline.LOCAL_BUILDERS['wordnet_gloss'] is wordnet.WordnetGloss
  assert pipeline.LOCAL_BUILDERS['jsonl_pairs'] is pairs.JsonlPairs
