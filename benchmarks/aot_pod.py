r"""The pod recipes compiled for TPU topologies on this CPU (`python -m contrastive.aot`): one
JSON line per variant (the per-device report plus the variant's name and flags).

  python benchmarks/aot_pod.py > benchmarks/results/aot_pod.jsonl   # ~15 min per row here

Needs libtpu (pip install -r requirements-tpu.txt). Variants: SimCLR ResNet-50 at batch 4096
on a v5e 4x4 slice, and the SigLIP pod config (ViT-B/16 at 224 px + text transformer B, batch
32,768) on v5e 16x16: float32 / bfloat16, the blockwise ring loss / the dense loss, GradCache,
an fsdp axis, rematerialised blocks; configs/siglip_webdataset.py:pod (the same towers and
batch, from the config a web-scale run starts). Each compiles in a fresh process; one that cannot fit is reported as XLA:TPU
refused it.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SIGLIP = ('configs/siglip_emoji.py:pod', 'v5e:16x16')
SIMCLR = ('configs/simclr_fmnist.py:resnet50', 'v5e:4x4')
BF16 = '--config.dtype=bfloat16'
VARIANTS = {
    'siglip_ring_f32': (*SIGLIP, ()),
    'siglip_ring_bf16': (*SIGLIP, (BF16,)),
    'siglip_ring_bf16_gradcache8k': (*SIGLIP, (BF16, '--config.grad_cache.micro_batch_size=8192')),
    'siglip_dense_bf16': ('configs/siglip_emoji.py:pod,dense', SIGLIP[1], (BF16,)),
    'siglip_ring_bf16_remat': (*SIGLIP, (BF16, '--config.model.remat=nothing_saveable')),
    'siglip_ring_bf16_fsdp4': (*SIGLIP, (BF16, "--config.mesh=(('data',64),('fsdp',4))")),
    'siglip_webdataset_ring_f32': ('configs/siglip_webdataset.py:pod', SIGLIP[1], ()),
    'simclr_r50_f32': (*SIMCLR, ()),
    'simclr_r50_bf16': (*SIMCLR, (BF16,)),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help=f'comma-separated, of {", ".join(VARIANTS)}')
  args = parser.parse_args()
  for name in args.variants.split(','):
    config, topology, flags = VARIANTS[name]
    cmd = [sys.executable, '-m', 'contrastive.aot', f'--config={config}',
           f'--topology={topology}', *flags]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if not lines:
      print(json.dumps(dict(variant=name, error=out.stderr.strip().splitlines()[-1:])),
            flush=True)
      continue
    report = json.loads(lines[-1])
    print(json.dumps(dict(variant=name, config=config, flags=list(flags), exit=out.returncode,
                          wall_s=time.perf_counter() - start, **report)), flush=True)


if __name__ == '__main__':
  main()
