r"""`python -m contrastive.evaluate` against CLIP_benchmark: zero-shot classification and
retrieval of the same random-init open_clip ViT-B-32, metric by metric.

  python3 -m venv /tmp/openclipenv
  /tmp/openclipenv/bin/pip install torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0 \
      safetensors clip-benchmark==1.6.2 requests   # clip_benchmark 1.6.2 imports requests
  python benchmarks/eval_vs_clip_benchmark.py --torch_python=/tmp/openclipenv/bin/python \
      [--work /tmp/evalbench] [--image_size 224] >> benchmarks/results/eval_vs_clip_benchmark.jsonl

Data (offline, under --work/data): the emoji_cldr test split's 453 distinct emoji renders
(64 px, bicubic-upscaled with Pillow to --image_size, 224 by default so that open_clip's
resize and ours are both the identity; JPEG quality 95) as an ImageFolder with one folder
per emoji group (9: 'Smileys_and_Emotion', ..., '&' -> 'and', spaces -> '_'), a retrieval
JSON-lines file of every image with each of its 2,249 English names and keywords as a
caption ({"image": path relative to the file, "text": caption}), and 3 templates.

The torch side (benchmarks/clip_benchmark_side.py, run by --torch_python) builds open_clip's
ViT-B-32 with torch.manual_seed(0), saves model.safetensors, and scores it with
clip_benchmark's zeroshot_classification.evaluate and zeroshot_retrieval.evaluate (float32).
This side imports the checkpoint (`python -m contrastive.weights import --format open_clip`)
and runs `python -m contrastive.evaluate --tasks zeroshot:imagefolder:DIR,retrieval:jsonl:FILE
--templates FILE --out FILE`. Prints clip_benchmark's lines, ours, each side's seconds, then
one line per (task, metric): both values, ours - theirs, and that difference in images (acc,
text retrieval: per image) or texts (image retrieval: per caption).
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = ('a photo of a {}.', 'an emoji of {}', '{}')
ARCH = 'ViT-B-32'


def group_folders():
  """The 9 emoji group names as folder names: '&' -> 'and', ' ' -> '_'."""
  from contrastive.data import emoji  # pylint: disable=g-import-not-at-top
  _, groups, _, _ = emoji.read_emoji_test()
  return [g.replace('&', 'and').replace(' ', '_') for g in groups]


def emoji_images():
  """{image_id: (group, [64, 64, 3] uint8, [texts])} of the emoji_cldr test split."""
  from contrastive.data import pair_batches  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  src = pair_batches.get_source(ml_collections.ConfigDict(dict(
      name='emoji_cldr', data_dir='', image_size=64, languages=('en',), max_examples=0)), 'test')
  out = collections.OrderedDict()
  for i in range(len(src)):
    r = src[i]
    entry = out.setdefault(int(r['image_id']), (int(r['group']), r['image'], []))
    entry[2].append(r['text'].decode('utf-8'))
  return out


def write_data(data, image_size):
  """-> (imagefolder dir, retrieval .jsonl, templates .txt, number of images, of texts)."""
  folders = group_folders()
  root = os.path.join(data, 'emoji_groups')
  shutil.rmtree(data, ignore_errors=True)
  lines = []
  images = emoji_images()
  for image_id, (group, pixels, texts) in sorted(images.items(),
                                                   key=lambda kv: (folders[kv[1][0]], kv[0])):
    rel = os.path.join('emoji_groups', folders[group], f'{image_id:05d}.jpg')
    os.makedirs(os.path.dirname(os.path.join(data, rel)), exist_ok=True)
    img = Image.fromarray(pixels)
    if image_size != img.size[0]:
      img = img.resize((image_size, image_size), Image.BICUBIC)
    img.save(os.path.join(data, rel), quality=95)
    lines.extend(json.dumps(dict(image=rel, text=t)) for t in texts)
  jsonl = os.path.join(data, 'retrieval.jsonl')
  with open(jsonl, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  templates = os.path.join(data, 'templates.txt')
  with open(templates, 'w', encoding='utf-8') as f:
    f.write('\n'.join(TEMPLATES) + '\n')
  return root, jsonl, templates, len(images), len(lines)


def run(cmd):
  """Runs cmd; -> (stdout, seconds); exits with its stderr's tail if it fails."""
  start = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f'failed ({out.returncode}): {" ".join(cmd)}\n{out.stderr[-3000:]}')
  return out.stdout, time.perf_counter() - start


def json_lines(text):
  return [json.loads(l) for l in text.splitlines() if l.startswith('{')]


def clip_benchmark_side(args, folder, jsonl, templates):
  """-> (its result lines, model.safetensors, seconds)."""
  out = os.path.join(args.work, 'torch')
  cmd = [args.torch_python, os.path.join(HERE, 'clip_benchmark_side.py'),
         f'--imagefolder={folder}', f'--retrieval={jsonl}', f'--templates={templates}',
         f'--out={out}', f'--arch={ARCH}']
  stdout, seconds = run(cmd)
  return json_lines(stdout), os.path.join(out, 'model.safetensors'), seconds


def our_side(args, checkpoint, folder, jsonl, templates):
  """Imports the checkpoint and evaluates it -> (our result lines, seconds of evaluate)."""
  workdir = os.path.join(args.work, 'workdir')
  shutil.rmtree(workdir, ignore_errors=True)
  run([sys.executable, '-m', 'contrastive.weights', 'import', '--format', 'open_clip',
       '--arch', ARCH, '--checkpoint', checkpoint, '--workdir', workdir])
  results = os.path.join(args.work, 'ours.jsonl')
  if os.path.exists(results):
    os.remove(results)
  _, seconds = run([sys.executable, '-m', 'contrastive.evaluate', '--workdir', workdir,
                    '--tasks', f'zeroshot:imagefolder:{folder},retrieval:jsonl:{jsonl}',
                    '--templates', templates, '--out', results])
  with open(results, encoding='utf-8') as f:
    return json_lines(f.read()), seconds


def unit(metric, n_images, n_texts):
  """The count a metric is a fraction of: ('texts', n) for image retrieval, else images."""
  if metric.startswith('image_retrieval'):
    return 'texts', n_texts
  return 'images', n_images


def compare(theirs, ours, n_images, n_texts):
  """One dict per (task, metric) of clip_benchmark's lines."""
  by_task = {line['task']: line for line in ours}
  rows = []
  for line in theirs:
    mine = by_task.get(line['task'], {}).get('metrics', {})
    for metric, value in line['metrics'].items():
      row = dict(task=line['task'], metric=metric, clip_benchmark=value, ours=mine.get(metric))
      if row['ours'] is not None:
        row['diff'] = row['ours'] - value
        if metric != 'mean_per_class_recall':
          name, n = unit(metric, n_images, n_texts)
          row[f'diff_{name}'] = round(row['diff'] * n)
      rows.append(row)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--torch_python', required=True)
  p.add_argument('--work', default='/tmp/evalbench')
  p.add_argument('--image_size', type=int, default=224, help='JPEG size (renders are 64)')
  args = p.parse_args()
  data = os.path.join(args.work, 'data')
  folder, jsonl, templates, n_images, n_texts = write_data(data, args.image_size)
  theirs, checkpoint, their_seconds = clip_benchmark_side(args, folder, jsonl, templates)
  for line in theirs:
    print(json.dumps(dict(side='clip_benchmark', **line)), flush=True)
  print(json.dumps(dict(side='clip_benchmark', seconds=their_seconds, images=n_images,
                        texts=n_texts, image_size=args.image_size)), flush=True)
  ours, our_seconds = our_side(args, checkpoint, folder, jsonl, templates)
  for line in ours:
    print(json.dumps(dict(side='ours', **line)))
  print(json.dumps(dict(side='ours', seconds=our_seconds)))
  for row in compare(theirs, ours, n_images, n_texts):
    print(json.dumps(row))


if __name__ == '__main__':
  main()
