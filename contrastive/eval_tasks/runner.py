r"""`python -m contrastive.evaluate`: the standard zero-shot and retrieval tasks on a workdir.

  python -m contrastive.evaluate --workdir W --tasks zeroshot:imagefolder:DIR,retrieval:jsonl:F \
      [--templates FILE] [--classnames FILE] [--data_dir D] [--out results.jsonl]

W is any two-tower workdir (trained here or imported by `python -m contrastive.weights`); its
images go through the workdir's recorded preprocessing (`inference.load`). Each task prints a
progress line and one JSON line in CLIP_benchmark's result layout:

  {"dataset": NAME, "model": W's name, "pretrained": W, "task": "zeroshot_classification" |
   "zeroshot_retrieval" |
   "linear_probe", "metrics": {"acc1", "acc5" (null below 5 classes), "mean_per_class_recall"} or
   {"image_retrieval_recall@k", "text_retrieval_recall@k"} or {"lp_acc1",
   "lp_mean_per_class_recall"}, "skipped_images": n, "language": "en"}

then a summary table. Templates: --templates (one per line, '{}' or CLIP_benchmark's '{c}' for the class name), else
CLIP's 80 ImageNet templates (contrastive/eval_tasks/data/imagenet_templates.txt). During
training the same tasks run with the periodic evaluation (`config.eval.tasks`,
`config.eval.templates`).
"""

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from contrastive import probe
from contrastive import retrieval
from contrastive.eval_tasks import metrics
from contrastive.eval_tasks import sources

DEFAULT_TEMPLATES = os.path.join(sources.DATA, 'imagenet_templates.txt')


def load_templates(path=''):
  """Templates from `path` (one per line) or CLIP's 80; EvalDataError without exactly one '{}'
  in each."""
  path = path or DEFAULT_TEMPLATES
  if not os.path.isfile(path):
    raise sources.EvalDataError(f'templates file {path!r} not found.')
  templates = [t.replace('{c}', '{}') for t in sources.read_lines(path)]  # CLIP_benchmark's too
  bad = [t for t in templates if t.count('{}') != 1]
  if not templates or bad:
    raise sources.EvalDataError(f'{path}: every line must hold one template with \'{{}}\' once'
                                f' for the class name; e.g. {bad[:1] or ["(empty file)"]}.')
  return templates


def _progress(name, done, total, start):
  rate = done / max(time.perf_counter() - start, 1e-9)
  print(f'{name}: {done}/{total} images, {rate:.1f} images/s, ETA '
        f'{(total - done) / max(rate, 1e-9):.0f} s', flush=True)


def zero_shot(model, task, templates, batch_size):
  """The zero-shot metrics of `task` (streamed) and the number of images skipped."""
  tokenize = lambda texts: np.asarray(model.tokenize(texts))
  class_emb = retrieval.class_embeddings(lambda t: model.encode_tokens(t), task.class_names,
                                         templates, tokenize)
  acc, batches, start, done = metrics.ZeroShot(class_emb), sources.Batches(task, batch_size), \
      time.perf_counter(), 0
  for images, labels in batches:
    acc.add(model.encode_image(images), labels)
    done += len(images)
    _progress(task.name, done + batches.skipped, len(task.images), start)
  return acc.result(), batches.skipped


def retrieval_task(model, task, batch_size):
  """Recall@1/5/10 both ways (images kept by their index; a skipped image's captions too)."""
  batches, embs, kept, start = sources.Batches(task, batch_size), [], [], time.perf_counter()
  for images, index in batches:
    embs.append(model.encode_image(images))
    kept.append(index)
    _progress(task.name, sum(map(len, kept)) + batches.skipped, len(task.images), start)
  kept = np.concatenate(kept)
  position = {int(i): p for p, i in enumerate(kept)}
  captions = [(position[i], text) for i, text in task.captions if i in position]
  text_emb = model.encode_text([t for _, t in captions])
  return (metrics.retrieval_recalls(np.concatenate(embs), text_emb, [p for p, _ in captions]),
          batches.skipped)


def _features(model, task, batch_size):
  """(L2-normalised image embeddings [N, D], labels [N], images skipped) of a task's images."""
  batches, embs, labels = sources.Batches(task, batch_size), [], []
  for images, y in batches:
    embs.append(model.encode_image(images))
    labels.append(y)
  return np.concatenate(embs), np.concatenate(labels), batches.skipped


def linear(model, task, batch_size, steps=500):
  """A linear probe (`probe.linear_probe`) on the train images' embeddings, scored on the
  test images: accuracy and mean per-class recall."""
  x, y, skipped = _features(model, task, batch_size)
  x_test, y_test, skipped_test = _features(model, task.test, batch_size)
  pred, _ = probe.linear_probe(x, y, x_test, num_classes=len(task.class_names), steps=steps)
  hit = np.asarray(pred) == y_test
  recall = [hit[y_test == c].mean() for c in np.unique(y_test)]
  return ({'lp_acc1': float(hit.mean()), 'lp_mean_per_class_recall': float(np.mean(recall))},
          skipped + skipped_test)


def run(model, tasks, *, templates, batch_size=256, model_name=''):
  """[result dict] of `tasks` (parsed `sources.Task`s) with `model` (encode_image on lists of
  uint8 images, encode_text, tokenize and encode_tokens: `inference.load`'s)."""
  results = []
  for task in tasks:
    if task.kind == 'zeroshot':
      values, skipped = zero_shot(model, task, templates, batch_size)
      kind = 'zeroshot_classification'
    elif task.kind == 'linear':
      values, skipped = linear(model, task, batch_size)
      kind = 'linear_probe'
    else:
      values, skipped = retrieval_task(model, task, batch_size)
      kind = 'zeroshot_retrieval'
    results.append(dict(dataset=task.name, model=os.path.basename(model_name.rstrip('/')),
                        pretrained=model_name, task=kind, metrics=values,
                        skipped_images=skipped, language='en'))
  return results


def summary(results):
  """A table of the results: one row per task, its metrics in columns."""
  lines = []
  for r in results:
    cells = ' | '.join(f'{k} {v:.4f}' for k, v in r['metrics'].items() if v is not None)
    lines.append(f'{r["dataset"]} ({r["task"]}): {cells}'
                 + (f' | skipped {r["skipped_images"]}' if r['skipped_images'] else ''))
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--tasks', required=True, help='comma-separated task names')
  p.add_argument('--templates', default='')
  p.add_argument('--classnames', default='', help='class names, one per line (zero-shot)')
  p.add_argument('--data_dir', default='')
  p.add_argument('--out', default='')
  p.add_argument('--batch_size', type=int, default=256)
  args = p.parse_args(argv)
  from contrastive import distributed  # pylint: disable=g-import-not-at-top
  from contrastive import inference  # pylint: disable=g-import-not-at-top
  if distributed.cpu_only_platform():  # no libtpu probing on a CPU host
    jax.config.update('jax_platforms', 'cpu')
  try:  # every data check before the model is loaded
    tasks = [sources.parse(t.strip(), args.data_dir, args.classnames)
             for t in args.tasks.split(',') if t.strip()]
    templates = load_templates(args.templates)
    model = inference.load(args.workdir)
    if not hasattr(model, 'encode_text'):
      raise sources.EvalDataError(f'{args.workdir} is not a two-tower workdir (no text tower).')
  except (sources.EvalDataError, FileNotFoundError) as e:
    print(f'ERROR: {type(e).__name__}: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(1)
  results = run(model, tasks, templates=templates, batch_size=args.batch_size,
                model_name=os.path.abspath(args.workdir))
  for r in results:
    print(json.dumps(r), flush=True)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in results)
  print(summary(results), flush=True)
