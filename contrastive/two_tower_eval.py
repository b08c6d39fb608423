"""Evaluation of the two-tower recipes on the held-out split: retrieval both ways, zero-shot
classification, alignment and uniformity.

- Retrieval: every distinct side-a item (an emoji image, a word) queries every distinct side-b
  text and vice versa; a hit at k is any of the top k that the held-out pairs link to the query
  (identical texts are one item, so every emoji or sense sharing a text counts as correct).
  The top k comes from `retrieval.topk_retrieval`, a running top-k over key blocks (never an
  N x M matrix).
- Zero-shot: the items of one side are classified by the other tower's embeddings of class
  prompts (CLIP's prompt ensembling: each class's template embeddings averaged): emoji images
  into the 9 emoji groups (prompts from the group and its subgroup names), WordNet glosses into
  the 45 lexicographer categories (prompts through the word tower). Reported as top-1 and
  balanced top-1 (mean per-class recall; chance = 1 / classes). Where a class has several
  names (an emoji group and its subgroups), `zero_shot_subclass/` also classifies by the
  nearest name (each name's templates averaged): a class scores its best subclass.
- Cross-style zero-shot (emoji): the held-out emoji drawn as monochrome glyphs of another font
  (contrastive/data/emoji_styles.py), classified by the same class embeddings:
  `zero_shot_cross_style/` (and `noto_top1` / `noto_balanced_top1`: the same emoji in the
  training font), `zero_shot_cross_style_seen/` (the training split's emoji in that font).
- Alignment / uniformity (Wang & Isola 2020) of the normalised embeddings.
"""

import functools

import jax
import numpy as np

from contrastive import evaluate
from contrastive import parallel
from contrastive import retrieval
from contrastive.data import emoji
from contrastive.data import emoji_styles
from contrastive.data import glyphs
from contrastive.data import pair_batches
from contrastive.data import webdataset
from contrastive.data import wordnet
from contrastive.data.fashion_mnist import MissingDatasetError
from contrastive.eval_tasks import runner
from contrastive.eval_tasks import sources
from contrastive.negatives import negclip

EMOJI_TEMPLATES = ('an emoji of {}', '{}', 'a {} emoji', 'a picture of {}')
WORDNET_TEMPLATES = ('{}', 'a word about {}', 'something to do with {}')
PHOTO_TEMPLATES = ('a photo of a {}.', 'a photo of the {}.', '{}')


def zero_shot_classes(dataset_cfg, ev, pair_spec):
  """(side classified: 'a' | 'b', labels [N], class texts [C][*], templates) or None."""
  dataset_name = dataset_cfg.name
  if dataset_name == 'webdataset':  # images into config.dataset.class_names, if given
    names = webdataset.class_names(webdataset.settings(dataset_cfg))
    labels = np.array([int(r['label']) for r in ev['a_records']])
    if not names or not (labels >= 0).any():
      return None
    return 'a', labels, [[n] for n in names], PHOTO_TEMPLATES
  if dataset_name == 'emoji_cldr':
    _, groups, subgroups, subgroup_group = emoji.read_emoji_test()
    names = [[g.replace('&', 'and')] + [s.replace('-', ' ') for s, sg in
                                         zip(subgroups, subgroup_group) if sg == i]
             for i, g in enumerate(groups)]
    labels = np.array([int(r['group']) for r in ev['a_records']])
    return 'a', labels, names, EMOJI_TEMPLATES
  if dataset_name == 'wordnet_gloss':
    names = [[n.split('.')[1].lower()] for n in wordnet.LEXNAMES]
    labels = np.array([int(r['lexname']) for r in ev['b_records']])
    return 'b', labels, names, WORDNET_TEMPLATES
  del pair_spec
  return None


def cross_style_sets(dataset_cfg, split):
  """{metric prefix: (images [N, S, S, 3] uint8, labels [N])} of the cross-style zero-shot
  (module doc): emoji_cldr's `split` drawn in the monochrome font, with its Noto renders as
  'noto', and (for a held-out split) the training split's; {} for other datasets, or without
  the font (one printed line names its Debian package)."""
  if dataset_cfg.name != 'emoji_cldr':
    return {}
  try:
    font = glyphs.check_font(glyphs.SYMBOLA_PATH)
  except MissingDatasetError as e:
    print(f'{e} No zero_shot_cross_style metrics.', flush=True)
    return {}
  size, subset = dataset_cfg.image_size, dataset_cfg.get('max_examples', 0)
  out = {}
  for prefix, part in (('zero_shot_cross_style', split), ('zero_shot_cross_style_seen', 'train')):
    if prefix.endswith('seen') and split == 'train':
      continue
    drawn = emoji_styles.cross_style_split(part, image_size=size, max_emoji=subset,
                                           font_path=font)
    print(f'{prefix}: {len(drawn["group"])} of the {drawn["num_distinct"]} distinct {part} '
          'emoji drawn in the cross-style font.', flush=True)
    out[prefix] = drawn['image'], drawn['group']
    if part == split:  # the same emoji in the training font: the style's share of the gap
      out[prefix + '/noto'] = emoji.render(drawn['sequence'], size)[0], drawn['group']
  return out


def standard_tasks(eval_cfg):
  """(parsed config.eval.tasks, templates): the standard benchmarks of the periodic evaluation
  (comma-separated task names, eval.templates a file or '' for CLIP's 80; eval.data_dir);
  ([], []) without tasks. EvalDataError (one line) if their data is not usable."""
  names = [t.strip() for t in str(eval_cfg.get('tasks', '') or '').split(',') if t.strip()]
  if not names:
    return [], []
  return ([sources.parse(t, eval_cfg.get('data_dir', ''), eval_cfg.get('classnames', ''))
           for t in names], runner.load_templates(eval_cfg.get('templates', '')))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _order_probe(ev, num, seed, encode):
  """(a indices, b indices, tokens [N P, L], valid [N, P]) of ARO's order test with P = `num`
  > 0 perturbations (else None): each held-out a item with its first linked text b and P
  word-order perturbations of it (`negatives.negclip`, seeded by `seed`)."""
  if not num:
    return None
  first = {}
  for a_i, b_i in ev['pairs'].tolist():
    first.setdefault(a_i, b_i)
  a_idx = np.array(sorted(first))
  b_idx = np.array([first[i] for i in a_idx])
  texts, valid = negclip.negative_captions([ev['b_items'][j] for j in b_idx], num, seed)
  return a_idx, b_idx, encode([t for row in texts for t in row]), valid


class TwoTowerEvaluator:
  """Loads the held-out split once; `evaluator(state)` returns the metrics of the module doc.

  a_tower: the tower that embeds side a, 'a' (the model's tower a) or 'b' (text queries of a
  mixture with image parts go through the text tower: contrastive/data/mixture.py).
  order_probe: P > 0 adds ARO's order test with P NegCLIP perturbations per text (0: none).
  """

  def __init__(self, config, model, mesh, source, pair_spec, tokenizer, a_tower='a', *,
               order_probe=0, task_model=None):
    self.cfg, self.mesh, self.spec = config.eval, mesh, pair_spec
    self.ev = pair_batches.eval_pairs(source, pair_spec)
    context = config.tokenizer.context
    encode = lambda items: tokenizer.encode(items, context)[0]
    self.a = self.ev['a_items'] if pair_spec.a_is_image else encode(self.ev['a_items'])
    self.b = encode(self.ev['b_items'])
    self.zero_shot = zero_shot_classes(config.dataset, self.ev, pair_spec)
    if self.zero_shot:
      side, labels, names, templates = self.zero_shot
      prompts = [t.format(n) for names_c in names for n in names_c for t in templates]
      name_class = np.repeat(np.arange(len(names)), [len(c) for c in names])  # [names]
      self.prompts, self.name_class = encode(prompts), name_class
    self.order = _order_probe(self.ev, order_probe, config.seed, encode)
    self.cross_style = (cross_style_sets(config.dataset, config.eval.get('split', 'test'))
                        if self.zero_shot and pair_spec.a_is_image else {})
    repl = parallel.replicated(mesh)
    apply = lambda method: jax.jit(
        lambda variables, x: evaluate.widen(model.apply(variables, x, method=method,
                                                        normalize=True)),
        out_shardings=repl)
    self.a_tower = a_tower
    self._encode = {'a': apply(f'encode_{a_tower}'), 'b': apply('encode_b')}
    self._ks = tuple(config.eval.get('ks', (1, 5, 10)))
    self.task_model = task_model  # recipes.two_tower_model.TwoTowerModel, for eval.tasks
    self.tasks, self.templates = standard_tasks(config.eval)

  def embed(self, state, side, items):
    """items [N, ...] through tower `side` ('a' | 'b') -> L2-normalised [N, D] (numpy); texts
    in buckets of trimmed length (`evaluate.extract_token_features`)."""
    variables = {'params': state.params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    batch = self.cfg.batch_size
    fn = functools.partial(self._encode[side], variables)
    if np.issubdtype(np.asarray(items).dtype, np.integer) and np.ndim(items) == 2:  # texts
      return evaluate.extract_token_features(fn, items, self.mesh, batch)
    return evaluate.extract_features(fn, items, self.mesh, batch)

  def _recall(self, queries, keys, links):
    """{'r@k'}: share of queries with a linked key among their top k."""
    k = min(max(self._ks), keys.shape[0])
    _, top = retrieval.topk_retrieval(queries, keys, k=k, block_size=self.cfg.get(
        'block_size', 1024))
    top = np.asarray(top)
    codes = set((links[:, 0].astype(np.int64) * keys.shape[0] + links[:, 1]).tolist())
    hit = np.array([[q * keys.shape[0] + j in codes for j in row] for q, row in enumerate(top)])
    return {f'r@{kk}': float(np.mean(np.any(hit[:, :kk], axis=1))) for kk in self._ks}

  def __call__(self, state):
    za, zb = self.embed(state, 'a', self.a), self.embed(state, 'b', self.b)
    links = self.ev['pairs']
    metrics = {f'a2b/{k}': v for k, v in self._recall(za, zb, links).items()}
    metrics.update({f'b2a/{k}': v for k, v in self._recall(zb, za, links[:, ::-1]).items()})
    if self.zero_shot:
      side, labels, names, _ = self.zero_shot
      other = 'b' if side == 'a' else 'a'
      items = (za if side == 'a' else zb)[labels >= 0]  # -1: an item without a class
      labels = labels[labels >= 0]
      prompts = self.embed(state, other, self.prompts)  # [names * templates, D]
      per_name = prompts.reshape(len(self.name_class), -1, prompts.shape[-1]).mean(1)
      classes = np.stack([per_name[self.name_class == c].mean(0) for c in range(len(names))])
      scores = retrieval.zero_shot_accuracy(items, _unit(classes), labels)
      metrics.update({f'zero_shot/{k}': float(v) for k, v in scores.items()})
      metrics['zero_shot/chance'] = 1.0 / len(names)
      if len(self.name_class) > len(names):  # classes with subclass names: the nearest decides
        scores = retrieval.zero_shot_accuracy(items, _unit(per_name), labels,
                                              class_of=self.name_class)
        metrics.update({f'zero_shot_subclass/{k}': float(v) for k, v in scores.items()})
      for name, (images, labels) in self.cross_style.items():  # other drawings, same classes
        scores = retrieval.zero_shot_accuracy(self.embed(state, 'a', images), _unit(classes),
                                              labels)
        prefix, noto = name.removesuffix('/noto'), 'noto_' * name.endswith('/noto')
        metrics.update({f'{prefix}/{noto}{k}': float(v) for k, v in scores.items()})
    if self.order is not None:  # NegCLIP: does the model tell a text from its reorderings?
      a_idx, b_idx, tokens, valid = self.order
      zneg = self.embed(state, 'b', tokens).reshape(*valid.shape, -1)
      metrics['order_sensitivity'] = float(negclip.order_sensitivity(za[a_idx], zb[b_idx], zneg,
                                                                     valid))
      metrics['order_sensitivity/chance'] = float(np.mean(1 / (1 + valid.sum(1)[valid.any(1)])))
    metrics['alignment'] = float(retrieval.alignment(za[links[:, 0]], zb[links[:, 1]]))
    metrics['uniformity_a'] = float(retrieval.uniformity(za))
    metrics['uniformity_b'] = float(retrieval.uniformity(zb))
    metrics.update(self._standard_tasks(state))
    return metrics

  def _standard_tasks(self, state):
    """config.eval.tasks (contrastive/eval_tasks/runner.py) on the state's towers:
    {'DATASET/METRIC': value}, e.g. 'imagefolder:val/acc1'."""
    if not self.tasks:
      return {}
    self.task_model.variables = {'params': state.params}
    results = runner.run(self.task_model, self.tasks, templates=self.templates,
                         batch_size=self.cfg.batch_size)
    return {f'{r["dataset"]}/{k}': v for r in results for k, v in r['metrics'].items()
            if v is not None}


class MixtureEvaluator:
  """A mixture's evaluation (contrastive/data/mixture.py): each part's `TwoTowerEvaluator`
  on its own held-out split, metrics prefixed by the part's name ('emoji_cldr/a2b/r@1')."""

  def __init__(self, evaluators):
    self.evaluators = dict(evaluators)
    # embed(state, 'a', images) for the loop's tables: a part whose side a is tower a's
    self._towers = next(e for e in self.evaluators.values() if e.a_tower == 'a')

  def embed(self, state, side, items):
    """items through the model's tower `side` ('a' | 'b') -> L2-normalised [N, D] (numpy)."""
    return self._towers.embed(state, side, items)

  def __call__(self, state):
    return {f'{name}/{k}': v for name, evaluator in self.evaluators.items()
            for k, v in evaluator(state).items()}
