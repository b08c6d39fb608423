"""Every config builds; invalid configs fail with a one-line message before any compilation."""

import glob
import os

import jax
import pytest

from contrastive import config_lib
from contrastive import validate
from contrastive.data import fashion_mnist
from contrastive.models import build_model

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', 'configs')
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))
VARIANTS = {
    'simclr_fmnist.py': [None, 'runlocal', 'resnet18', 'resnet50', 'resnet18,runlocal',
                         'mining,mochi', 'runlocal,ft,threshold,gist', 'mcl', 'vit',
                         'vit,runlocal'],
    'moco_v2_fmnist.py': [None, 'runlocal', 'runlocal,mining,mochi,ft,threshold,gist',
                          'runlocal,loss=amcl'],
    'moco_v3_fmnist.py': [None, 'runlocal'],
    'siglip_emoji.py': [None, 'runlocal', 'resnet', 'lit', 'pod', 'pod,dense', 'resnet,lit,runlocal',
                        'sketch'],
    'clip_emoji.py': [None, 'runlocal', 'lit', 'pod', 'lit,clip_b32', 'amcl', 'amcl,runlocal'],
    'siglip_webdataset.py': [None, 'runlocal', 'pod'],
    'siglip_wordnet.py': [None, 'runlocal', 'lit', 'pod', 'transformer', 'runlocal,transformer'],
    'clip_emoji_wordnet.py': [None, 'runlocal,lit', 'transformer'],
    'siglip_emoji_wordnet.py': [None, 'bag', 'runlocal,bag', 'runlocal,sketch'],
    'siglip_pairs.py': [None, 'runlocal', 'lit', 'pod', 'resnet,runlocal'],
}


def test_every_registered_loss_is_a_config_variant():
  from contrastive.losses import PAIR_LOSSES  # pylint: disable=g-import-not-at-top
  path = os.path.join(CONFIG_DIR, 'simclr_fmnist.py')
  for name in PAIR_LOSSES:
    config = load_config(path, f'runlocal,loss={name}')
    config.dataset.name = 'not_local'
    validate.validate_config(config, num_devices=8, num_processes=1)
    assert config.loss.name == name
  with pytest.raises(ValueError, match='loss=.nt_xnet. is unknown'):
    load_config(path, 'loss=nt_xnet')


load_config = config_lib.load_config


def test_there_are_configs():
  assert CONFIG_FILES


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_builds_and_model_inits(path, tmp_path):
  for arg in VARIANTS.get(os.path.basename(path), [None]):
    config = load_config(path, arg)
    if config.get('family') == 'two_tower':
      _two_tower_config_builds(config, tmp_path)
      continue
    config.dataset.idx_dir = fashion_mnist.DEBIAN_IDX_DIR
    model = build_model(config.model)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                    jax.numpy.zeros((2, 28, 28, 1)), train=False))
    assert 'params' in shapes and 'batch_stats' in shapes
    # Validation itself, minus the dataset check (the IDX files may be absent here).
    config.dataset.name = 'not_local'
    validate.validate_config(config, num_devices=8, num_processes=1)


def _two_tower_config_builds(config, tmp_path):
  """The model initialises (shapes only: the pod variant is ViT-B/16 + text B) and the config
  validates, its dataset's Debian files included (make install provides them). A JSON-lines
  config is refused without its file, then validated on a text-text file (its image tower
  becomes a text tower)."""
  from contrastive.recipes import two_tower  # pylint: disable=g-import-not-at-top
  from contrastive.data import mixture  # pylint: disable=g-import-not-at-top
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  from contrastive.models import build_two_tower  # pylint: disable=g-import-not-at-top
  model = build_two_tower(two_tower.model_config(config))
  name, _ = mixture.part_configs(config.dataset)[0]  # a mixture: its first part's kind
  if name == 'jsonl_pairs':
    name = 'jsonl_pairs:image_text'
    with pytest.raises(config_lib.ConfigError, match='--config.dataset.jsonl_path=FILE'):
      validate.validate_config(config, num_devices=8, num_processes=1)
    config.dataset.jsonl_path = str(tmp_path / 'words.jsonl')
    if not os.path.exists(config.dataset.jsonl_path):  # records for the pod's batch of 32,768
      with open(config.dataset.jsonl_path, 'w', encoding='utf-8') as f:
        f.writelines(f'{{"text_a": "w{i}", "text_b": "g{i}"}}\n' for i in range(40000))
  inputs = two_tower.example_inputs(config, pair_batches.SPECS[name])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  assert {'tower_a', 'proj_a', 'logit'} <= set(shapes['params'])
  if config.lit.locked_tower:  # the :lit variants load the locked tower with model_init
    with pytest.raises(config_lib.ConfigError, match='loads nothing into it'):
      validate.validate_config(config, num_devices=8, num_processes=1)
    config.lit.allow_random_locked = True
  validate.validate_config(config, num_devices=8, num_processes=1)
  if config.dataset.name == 'jsonl_pairs':
    assert 'image' not in config.model and config.model.a.name == 'text'
  if config.batch_size == 32768:  # pod: ViT-B/16 (~86M) or text B (~110M), + text B (~110M)
    n = sum(x.size for x in jax.tree.leaves(shapes['params']))
    if config.model.get('share'):  # one text B (WordNet) for both sides
      assert 'tower_b' not in shapes['params'] and 100e6 < n < 125e6, n
    else:
      assert 190e6 < n < 225e6, n


def test_resnet18_preset_size():
  config = load_config(os.path.join(CONFIG_DIR, 'simclr_fmnist.py'), 'resnet18')
  variables = jax.eval_shape(lambda: build_model(config.model).init(
      jax.random.key(0), jax.numpy.zeros((2, 32, 32, 3)), train=False))
  encoder = variables['params']['encoder']
  n = sum(x.size for x in jax.tree.leaves(encoder))
  assert 11.1e6 < n < 11.3e6  # CIFAR-style ResNet-18: 11.17M parameters


def set_fields(config, changes):
  """Sets {'dotted.field': value} in `config`; returns it."""
  for field, value in changes.items():
    target = config
    *parents, leaf = field.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def _base(**changes):
  config = load_config(os.path.join(CONFIG_DIR, 'simclr_fmnist.py'))
  config.dataset.name = 'not_local'
  return set_fields(config, changes)


@pytest.mark.parametrize('changes,num_devices,message', [
    ({'batch_size': 100}, 8, 'config.batch_size=100 is not divisible by the 8 devices'),
    ({'optimizer.name': 'adam_typo'}, 1, "config.optimizer.name='adam_typo' is unknown"),
    ({'loss.name': 'infonce_typo'}, 1, "config.loss.name='infonce_typo' is unknown"),
    ({'loss.temperature': 0.0}, 1, 'config.loss.temperature=0.0 must be > 0'),
    ({'mesh': [('data', 3)]}, 8, 'has 3 devices but there are 8'),
    ({'model.preset': 'resnet7'}, 1, "config.model.preset='resnet7' is unknown"),
    ({'model.pool': 'max'}, 1, "config.model.pool='max' is unknown; choose one of ['avg', 'flatten']"),
    ({'model.encoder': {'name': 'vitt'}}, 1, "config.model.encoder: unknown tower name 'vitt'"),
    ({'model.encoder': {'name': 'vit', 'depht': 2}}, 1, "unknown vit tower fields ['depht']"),
    ({'eval.batch_size': 999}, 8, 'config.eval.batch_size=999 is not divisible'),
    ({'method': 'byol'}, 1, "config.method='byol' is unknown"),
    ({'method': 'moco'}, 1, 'takes its keys from a momentum encoder'),
    ({'queue_size': 1000}, 1, 'queue size K=1000 must be a positive multiple of the global batch'),
    ({'momentum.schedule': 'linear'}, 1, "config.momentum.schedule='linear' is unknown"),
    ({'samplers.gist': True}, 1, 'config.samplers.gist needs a guide'),
    ({'samplers.mining_k': 8}, 1, "config.loss.name='nt_xent': the momentum encoder"),
    ({'samplers.mochi.num_hard': 1}, 1, 'config.samplers.mochi: num_hard=1 must be >= 2'),
])
def test_invalid_config_message(changes, num_devices, message):
  with pytest.raises(validate.ConfigError, match=message.replace('(', r'\(').replace('[', r'\[')) as e:
    validate.validate_config(_base(**changes), num_devices=num_devices, num_processes=1)
  assert '\n' not in str(e.value)


def test_unknown_variant():
  with pytest.raises(ValueError, match=r"Unknown config variant\(s\) \['mochii'\]"):
    load_config(os.path.join(CONFIG_DIR, 'moco_v2_fmnist.py'), 'runlocal,mochii')
  mixture = os.path.join(CONFIG_DIR, 'clip_emoji_wordnet.py')
  with pytest.raises(ValueError, match=r"\['bagg'\]; choose from .*'transformer'"):
    load_config(mixture, 'bagg')


def test_clip_mixture_text_tower():
  """clip_emoji_wordnet's text tower: the bag of pieces unless `transformer` is asked for."""
  path = os.path.join(CONFIG_DIR, 'clip_emoji_wordnet.py')
  bag, transformer = load_config(path).model.text, load_config(path, 'transformer').model.text
  assert (bag.depth, bag.positions, bag.width) == (0, False, 256)
  assert 'depth' not in transformer and transformer.pool == 'mean'


def test_batch_not_divisible_by_processes():
  with pytest.raises(validate.ConfigError, match='not divisible by the 3 processes'):
    validate.validate_config(_base(batch_size=512), num_devices=1, num_processes=3)


def test_collective_is_refused_where_there_is_none_to_choose():
  config = load_config(os.path.join(CONFIG_DIR, 'moco_v2_fmnist.py'), 'runlocal')
  config.dataset.name = 'not_local'
  config.loss.block_size = 64
  validate.validate_config(config, num_devices=1, num_processes=1)  # block_size alone: fine
  config.loss.collective = 'all_gather'
  with pytest.raises(validate.ConfigError,
                     match='config.loss.collective: the MoCo / sampler / MCL step'):
    validate.validate_config(config, num_devices=1, num_processes=1)
