"""Where the default recipe's train step spends its time on XLA:CPU: per-op times from a trace.

Builds the step that `contrastive.main` runs (benchmarks/step_overhead.py: configs/FILE with
its variants at --batch_size on --devices CPU devices), warms it up, traces --steps steps with
jax.profiler (XLA:CPU records one event per executed op with
`--xla_cpu_enable_xprof_traceme=true`, which this script sets), and adds up the events' durations
per HLO instruction. Each instruction is named after the optimized HLO's metadata:

  part   augment | encoder | head | loss | optimizer | other (the jax.named_scope or Flax
         module the op comes from: objectives.image_views and step.update name theirs)
  pass   forward | backward (its op_name is under transpose(...), i.e. a gradient)
  kind   the HLO opcode, or for fusions their kind and the library that runs them (ynn: YNNPACK)

Prints one JSON line per (part, pass), per kind (the 12 costliest) and per --top
instruction, with milliseconds per step summed over the threads that ran them (so on 2
devices the sum is up to 2x the wall time), and one line with the step's wall time (median of
the traced steps, traced: tracing adds a little) and the sum:

  PYTHONPATH=. python benchmarks/step_profile.py --batch_size=256 --devices=2

Extra XLA flags (a lever to measure) go in XLA_FLAGS as usual; the script appends its own.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile

PARTS = ('augment', 'loss', 'optimizer', 'head', 'encoder')  # first match in op_name wins


def instructions(hlo_text):
  """{name: (kind, op_name)} of the optimized HLO's instructions. An instruction without an
  op_name (in a loop body, say) takes that of the instruction calling its computation."""
  found, computation_of, caller = {}, {}, {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$', line)
    if head:
      current = head.group(1)
      continue
    m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', line)
    if not m:
      continue
    name, rest = m.groups()
    opcode = re.search(r'\b([a-z][\w\-]*)\(', rest)
    kind = opcode.group(1) if opcode else '?'
    fusion = re.search(r'"kind":"(\w+)"', rest) or re.search(r'kind=(\w+)', rest)
    if kind == 'fusion' and fusion:
      kind = f'fusion:{fusion.group(1).strip("_")}'
    op_name = re.search(r'op_name="([^"]*)"', rest)
    found[name] = (kind, op_name.group(1) if op_name else '')
    computation_of[name] = current
    for callee in re.findall(r'(?:body|condition|calls|to_apply)=%?([\w.\-]+)', rest):
      caller[callee] = name

  def inherited(name, depth=0):
    kind, op_name = found[name]
    parent = caller.get(computation_of[name])
    if op_name or parent is None or depth > 20:
      return op_name
    return inherited(parent, depth + 1)

  return {name: (kind, inherited(name)) for name, (kind, _) in found.items()}


def classify(op_name):
  """(part, pass) of an instruction from its metadata's op_name."""
  part = next((p for p in PARTS if re.search(rf'\b{p}\b', op_name, re.IGNORECASE)), 'other')
  if part == 'encoder' and 'ContrastiveModel' not in op_name:
    part = 'other'
  return part, 'backward' if 'transpose(' in op_name else 'forward'


def op_times(trace_dir, steps):
  """{event name: milliseconds per step} summed over XLA's threads in the trace."""
  import jax  # pylint: disable=g-import-not-at-top
  path, = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  plane = jax.profiler.ProfileData.from_file(path).find_plane_with_name('/host:CPU')
  totals = collections.Counter()
  for line in plane.lines:
    if 'XLA' in line.name:  # tf_XLAEigen/... (intra-op pool), tf_XLAPjRtCpuClient/... (devices)
      for ev in line.events:
        totals[ev.name] += ev.duration_ns / 1e6 / steps
  return totals


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--config', default='simclr_fmnist.py')
  p.add_argument('--variants', default='')
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--devices', type=int, default=2)
  p.add_argument('--steps', type=int, default=5, help='traced steps')
  p.add_argument('--top', type=int, default=25, help='instructions listed one by one')
  p.add_argument('--xla_conv_grads', action='store_true',
                 help="XLA's own convolution gradients instead of conv.Conv's im2col ones")
  args = p.parse_args(argv)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', args.devices)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import step_overhead  # pylint: disable=g-import-not-at-top
  from contrastive.models import conv  # pylint: disable=g-import-not-at-top

  if args.xla_conv_grads:
    conv.target_backend('gpu').__enter__()  # Conv's path off the CPU, for the whole run
  run = step_overhead.build_variant(args.config, args.variants, args.batch_size)
  names = instructions(run.hlo_text())
  run(0), run(1)  # compile, warm up
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      wall = [run(2 + i) for i in range(args.steps)]
    totals = op_times(trace_dir, args.steps)
  groups, kinds, listed = collections.Counter(), collections.Counter(), []
  for name, ms in totals.items():
    if name not in names:  # the runtime's own events (ThunkExecutor::Execute, locks, ...)
      continue
    kind, op_name = names[name]
    part, pass_ = classify(op_name)
    groups[part, pass_] += ms
    kinds[kind] += ms
    listed.append(dict(instruction=name, ms=round(ms, 2), part=part, pass_=pass_, kind=kind,
                       op_name=op_name[-120:]))
  common = dict(config=f'{args.config}:{args.variants}', batch=args.batch_size,
                devices=jax.device_count(), xla_flags=os.environ['XLA_FLAGS'],
                xla_conv_grads=args.xla_conv_grads)
  ops_ms = sum(groups.values())
  print(json.dumps(dict(common, record='step', wall_ms=round(1e3 * statistics.median(wall), 1),
                        ops_ms=round(ops_ms, 1))), flush=True)
  for (part, pass_), ms in sorted(groups.items(), key=lambda kv: -kv[1]):
    print(json.dumps(dict(common, record='part', part=part, pass_=pass_, ms=round(ms, 1),
                          share=round(ms / ops_ms, 3))), flush=True)
  for kind, ms in kinds.most_common(12):
    print(json.dumps(dict(common, record='kind', kind=kind, ms=round(ms, 1),
                          share=round(ms / ops_ms, 3))), flush=True)
  for row in sorted(listed, key=lambda r: -r['ms'])[:args.top]:
    print(json.dumps(dict(common, record='op', **row)), flush=True)


if __name__ == '__main__':
  main()
