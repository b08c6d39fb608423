r"""SigLIP on your own pairs: a JSON-lines file of image-text or text-text pairs.

  python -m contrastive.main --config configs/siglip_pairs.py --workdir /tmp/my_pairs \
      --config.dataset.jsonl_path=pairs.jsonl
  python -m contrastive.main --config configs/siglip_pairs.py:runlocal --workdir /tmp/pairs_local \
      --config.dataset.jsonl_path=pairs.jsonl

One record per line, all of one kind (contrastive/data/jsonl_records.py):

  {"image": "imgs/cat.png", "text": "a photo of a cat"}   # a ViT (32 px, patches of 8) and a text transformer
  {"text_a": "dog", "text_b": "a domesticated canid"}     # two text transformers (separate weights)

The file decides the towers: for text_a/text_b records the image tower is replaced by a copy
of the text tower before the run starts (`two_tower_checks.resolve_pair_towers`; the workdir's
config.json holds the towers that ran). Image paths are absolute or relative to the file's
folder. Held out for evaluation (retrieval both ways): the records whose "split" is "test", or,
where no record has a "split", 10% of them by a hash of the image path / text a
(`--config.dataset.test_fraction`). Converted once into array_record under
`--config.dataset.data_dir` (default ~/tensorflow_datasets) and again when the file or its
images change; a workdir whose run trained on the file before it changed is refused.

Variants: those of siglip_emoji.py (`runlocal`: tiny towers, batch 32, 6 steps; `resnet`,
`lit`, `pod`, `dense`, `clip_b32`).
"""

from contrastive import config_lib


def get_config(arg=None):
  """The SigLIP config of a JSON-lines file of pairs; `arg`: comma-separated variants."""
  siglip = config_lib.sibling(__file__, 'siglip_emoji.py')
  variants = set(filter(None, (arg or '').split(',')))
  config = siglip.base_config('siglip')
  # jsonl_path: required; test_fraction: held out by hash where no record has a "split".
  config.dataset = dict(name='jsonl_pairs', jsonl_path='', data_dir='', image_size=32,
                        test_fraction=0.1)
  config.tokenizer.update(vocab_size=8000, context=32)
  config.num_epochs = 10.0
  config = siglip.apply_variants(config, variants)
  if 'max_examples' in config.dataset:  # runlocal's emoji field: a file is read whole
    del config.dataset['max_examples']
  return config
