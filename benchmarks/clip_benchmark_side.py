r"""CLIP_benchmark's side of benchmarks/eval_vs_clip_benchmark.py: run by the torch
environment's Python (it imports torch, open_clip and clip_benchmark only, never this repo).

  /tmp/openclipenv/bin/python benchmarks/clip_benchmark_side.py --imagefolder DIR \
      --retrieval FILE.jsonl --templates FILE.txt --out OUT [--arch ViT-B-32] [--amp]

Builds open_clip's `--arch` with its random initialisation (torch.manual_seed(0),
`create_model_and_transforms(arch, pretrained=None)`), writes its state dict to
OUT/model.safetensors, and evaluates it with clip_benchmark's own functions, called directly
(its CLI has no reader for a plain ImageFolder or a JSON-lines caption file):

- zeroshot_classification.evaluate on torchvision's ImageFolder with open_clip's eval
  preprocess; class names are the folder names with '_' -> ' ' (as clip_benchmark's builder
  does for food101), the templates one per line with '{}' -> '{c}' (clip_benchmark formats
  `template.format(c=classname)`; its builder does this replacement for babel_imagenet);
- zeroshot_retrieval.evaluate (recall@1, 5, 10) on a dataset of the JSON-lines file's
  distinct images in first-appearance order, each with its captions in file order, batched
  with clip_benchmark's image_captions_collate_fn.

clip_benchmark 1.6.2's `accuracy` fails under NumPy >= 2.4 (`float()` of a 1-element 1-d
array: LAION-AI/CLIP_benchmark issue #147); `patch_accuracy` swaps in the same top-k count
taken with `.item()`. Batches of 64 (the CLI's default), shuffle off, no workers, float32
unless --amp (the CLI's default is amp on: bfloat16 autocast on CPU, float16 on CUDA).
Prints one JSON line per task in CLIP_benchmark's result layout (dataset, model, pretrained,
task, metrics, language); progress bars go to stderr.
"""

import argparse
import collections
import json
import os

from clip_benchmark.datasets.builder import image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification
from clip_benchmark.metrics import zeroshot_retrieval
import open_clip
from PIL import Image
from safetensors.torch import save_file
import torch
import torchvision


class JsonlCaptions(torch.utils.data.Dataset):
  """{"image": path relative to the file, "text": caption} lines -> (image, [captions])."""

  def __init__(self, path, transform):
    captions = collections.OrderedDict()
    with open(path, encoding='utf-8') as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          captions.setdefault(record['image'], []).append(record['text'])
    self.root = os.path.dirname(os.path.abspath(path))
    self.items = list(captions.items())
    self.transform = transform

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    image, texts = self.items[i]
    pixels = Image.open(os.path.join(self.root, image)).convert('RGB')
    return self.transform(pixels), texts


def accuracy(output, target, topk=(1,)):
  """clip_benchmark's zeroshot_classification.accuracy, the scalar taken with .item()."""
  pred = output.topk(max(topk), 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  n = len(target)
  return [correct[:k].reshape(-1).float().sum().item() / n for k in topk]


def patch_accuracy():
  """Its own accuracy where it still works (NumPy < 2.4), else the .item() form above."""
  try:
    zeroshot_classification.accuracy(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
  except TypeError:
    zeroshot_classification.accuracy = accuracy


def read_templates(path):
  """One template a line, '{}' for the class name -> clip_benchmark's '{c}' form."""
  with open(path, encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  return [t.replace('{}', '{c}') for t in lines if t.strip()]


def make_model(arch, out):
  """open_clip's random init (seed 0), saved as OUT/model.safetensors."""
  torch.manual_seed(0)
  model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
  model.eval()
  path = os.path.join(out, 'model.safetensors')
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return model, preprocess, path


def loader(dataset, batch_size, collate_fn=None):
  return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                     num_workers=0, collate_fn=collate_fn)


def classification(model, preprocess, tokenizer, args, device):
  dataset = torchvision.datasets.ImageFolder(args.imagefolder, transform=preprocess)
  classnames = [c.replace('_', ' ') for c in dataset.classes]
  return zeroshot_classification.evaluate(
      model, loader(dataset, args.batch_size), tokenizer, classnames,
      read_templates(args.templates), device=device, amp=args.amp)


def retrieval(model, preprocess, tokenizer, args, device):
  dataset = JsonlCaptions(args.retrieval, preprocess)
  return zeroshot_retrieval.evaluate(
      model, loader(dataset, args.batch_size, image_captions_collate_fn), tokenizer,
      device=device, amp=args.amp, recall_k_list=[1, 5, 10])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--imagefolder', required=True)
  p.add_argument('--retrieval', required=True)
  p.add_argument('--templates', required=True)
  p.add_argument('--out', required=True, help='folder for model.safetensors')
  p.add_argument('--arch', default='ViT-B-32')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--amp', action='store_true', help="autocast, as the CLI's default")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  patch_accuracy()
  torch.set_num_threads(os.cpu_count())
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model, preprocess, path = make_model(args.arch, args.out)
  model = model.to(device)
  tokenizer = open_clip.get_tokenizer(args.arch)
  tasks = ((f'zeroshot:imagefolder:{args.imagefolder}', 'zeroshot_classification',
            classification),
           (f'retrieval:jsonl:{args.retrieval}', 'zeroshot_retrieval', retrieval))
  for dataset, task, fn in tasks:
    metrics = fn(model, preprocess, tokenizer, args, device)
    print(json.dumps(dict(dataset=dataset, model=args.arch, pretrained=path, task=task,
                          metrics=metrics, language='en')), flush=True)


if __name__ == '__main__':
  main()
