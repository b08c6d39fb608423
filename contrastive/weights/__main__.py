r"""`python -m contrastive.weights`: import a public checkpoint as a workdir, or export one.

  python -m contrastive.weights import --format open_clip --arch ViT-B-32 \
      --checkpoint open_clip_model.safetensors --workdir W        # CLIP's BPE: bundled
  python -m contrastive.weights export --workdir W --format open_clip --out model.safetensors

W then loads like a trained run: `inference.load(W)`, the evaluator, and
`--config.model_init.workdir=W --config.model_init.mapping=tower_a:tower_a,proj_a:proj_a`
(LiT on a pretrained image tower). Architectures: open_clip ViT-B-32, ViT-B-16, ViT-L-14 and
their '-quickgelu' forms (OpenAI's weights). `--overrides` (JSON) changes sizes, e.g. for an
open_clip model config of other widths. Errors are one line; a failed import writes nothing.
"""

import argparse
import json
import sys

from contrastive.data import tokenizers
from contrastive.weights import convert
from contrastive.weights import importer


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='a public checkpoint -> a workdir')
  imp.add_argument('--format', required=True)
  imp.add_argument('--arch', required=True)
  imp.add_argument('--checkpoint', required=True)
  imp.add_argument('--tokenizer', default=None, help='tokenizer file (CLIP BPE: bundled)')
  imp.add_argument('--workdir', required=True)
  imp.add_argument('--overrides', default='', help='JSON: model sizes, image_size, vocab_size')
  exp = sub.add_parser('export', help='a workdir -> a checkpoint of the format')
  exp.add_argument('--workdir', required=True)
  exp.add_argument('--format', required=True)
  exp.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      overrides = json.loads(args.overrides) if args.overrides else None
      count = importer.import_checkpoint(args.format, args.arch, args.checkpoint, args.tokenizer,
                                         args.workdir, overrides)
      print(f'Imported {args.checkpoint} ({count:,} parameters) into {args.workdir}.')
    else:
      count = importer.export_workdir(args.workdir, args.format, args.out)
      print(f'Exported {args.workdir} ({count} tensors) to {args.out}.')
  except (convert.WeightsError, tokenizers.TokenizerFileError, json.JSONDecodeError,
          FileNotFoundError) as e:
    print(f'ERROR: {type(e).__name__}: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
