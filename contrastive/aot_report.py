"""The work of `python -m contrastive.aot`: a config's train step compiled for a TPU topology
described by libtpu, and its per-chip memory and FLOPs.

Per device (the compiled SPMD program is one device's: a chip, or on v4 without megacore one
of its two TensorCores, with half its HBM and FLOP/s):
  arguments  the train state's shard and the batch's (inputs);
  outputs    the new state and the metrics; donated state buffers (`alias`) are reused for the
             new state, so they are counted once;
  temp       XLA's temporaries at the peak of the step (activations, gradients, collectives);
  total      arguments + outputs - alias + temp + generated code: what must fit in HBM.
The step time it implies is FLOPs per chip / the chip's peak bf16 FLOP/s: a lower bound.
"""

import math
import re
import time

import jax

from contrastive import parallel
from contrastive import recipes
from contrastive import validate
from contrastive.config_lib import ConfigError
from contrastive.models import conv

GIB = 2 ** 30
# HBM per chip (GiB) and peak bf16 dense FLOP/s per chip, from Cloud TPU's system
# architecture pages (v4, v5e, v5p, v6e).
CHIPS = {
    'v4': dict(hbm_gib=32, peak_flops=275e12),
    'v5e': dict(hbm_gib=16, peak_flops=197e12),
    'v5p': dict(hbm_gib=95, peak_flops=459e12),
    'v6e': dict(hbm_gib=32, peak_flops=918e12),
}


class AotInputError(ValueError):
  """Bad input for the compile check (topology, config, missing libtpu): a one-line message."""


def topology_devices(name):
  """The TPU devices of topology `name` (e.g. 'v5e:4x4'), described by libtpu."""
  chip = name.split(':')[0]
  if chip not in CHIPS or ':' not in name:
    raise AotInputError(f'--topology={name!r}: expected CHIP:SHAPE with CHIP one of '
                        f'{tuple(CHIPS)}, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x8.')
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    return topologies.get_topology_desc(platform='tpu', topology_name=name).devices
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not jax_plugins():
      raise AotInputError('libtpu is not installed: pip install -r requirements-tpu.txt '
                          f'(jax[tpu] at the pinned jax) to compile for TPUs ({text}).') from None
    if 'libtpu' in text.lower():
      raise AotInputError(f'libtpu could not describe --topology={name!r}: {text}') from None
    raise AotInputError(f'--topology={name!r} is not a topology libtpu knows ({text}); e.g. '
                        'v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x8.') from None


def jax_plugins():
  """Names of the installed accelerator backends' libraries ('tpu' when libtpu is there)."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    return ('tpu',)
  except ImportError:
    return ()


def abstract_parts(config, mesh):
  """(abstract state, jitted step, abstract batch, abstract key) of `config` on `mesh`; reads
  only the shapes of the training data (the recipe's `abstract_parts`)."""
  rng = jax.random.key(config.seed)
  steps = int(config.get('total_steps') or 1000)  # the schedule's length: no effect on memory
  recipe = recipes.get(config)
  state, step_fn, batch = recipe.abstract_parts(recipe.settings(config), mesh, steps, rng)
  key = jax.eval_shape(lambda: rng)
  return state, step_fn, batch, jax.ShapeDtypeStruct(key.shape, key.dtype,
                                                     sharding=parallel.replicated(mesh))


def compile_for_topology(config, topology):
  """Compiles `config`'s train step for `topology`; returns the per-chip report (a dict)."""
  devices = topology_devices(topology)
  hosts = len({d.process_index for d in devices})
  # v4 (without megacore) describes each of a chip's two TensorCores as a device: they share
  # its HBM and FLOP/s.
  cores = len({getattr(d, 'core_on_chip', 0) for d in devices})
  try:
    validate.validate_config(config, num_devices=len(devices), num_processes=hosts)
  except ConfigError as e:
    raise AotInputError(f'config: {e}') from None
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  start = time.perf_counter()
  # The convolutions' gradients as the TPU runs them, not as this CPU would (models/conv.py).
  with conv.target_backend('tpu'):
    state, step_fn, batch, key = abstract_parts(config, mesh)
    lowered = step_fn.lower(state, batch, key)
    facts = dict(topology=topology, chips=len(devices) // cores, devices_per_chip=cores,
                 hosts=hosts, mesh=dict(mesh.shape), batch_size=config.batch_size)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      return out_of_memory(str(e), compile_s=time.perf_counter() - start, **facts)
  return summarize(compiled, compile_s=time.perf_counter() - start, **facts)


def out_of_memory(message, *, topology, devices_per_chip=1, **facts):
  """The report when XLA:TPU stops compiling because the step cannot fit, e.g. 'Ran out of
  memory on HBM, the total memory required for HLO temporaries (257.35G) exceeds available
  HBM (15.75G)': the needed GiB it names, when it names them, as the total."""
  line = next((l for l in message.splitlines() if 'RESOURCE_EXHAUSTED' in l), message)
  line = line[line.index('RESOURCE_EXHAUSTED'):].strip()
  sizes = re.findall(r'\(([0-9.]+)([KMGT])\)', line)
  scale = dict(K=2 ** -20, M=2 ** -10, G=1, T=2 ** 10)
  needed = float(sizes[0][0]) * scale[sizes[0][1]] if sizes else math.nan
  nan = math.nan
  return dict(topology=topology, chip=topology.split(':')[0],
              devices_per_chip=devices_per_chip, **facts, arguments_gib=nan,
              outputs_gib=nan, alias_gib=nan, temp_gib=needed, code_gib=nan, total_gib=needed,
              hbm_gib=_per_device(topology, devices_per_chip)[0], fits=False, tflops_per_chip=nan, step_s_at_peak=nan,
              xla_error=line)


def _per_device(topology, devices_per_chip):
  """(HBM GiB, peak FLOP/s) of one device of `topology`: a chip's, or its share."""
  chip = CHIPS[topology.split(':')[0]]
  return chip['hbm_gib'] / devices_per_chip, chip['peak_flops'] / devices_per_chip


def summarize(compiled, *, topology, devices_per_chip=1, **facts):
  """The report of a compiled step: memory (GiB per device: a chip, or a v4 TensorCore),
  FLOPs, implied step time, fits."""
  hbm_gib, peak_flops = _per_device(topology, devices_per_chip)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  parts = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
               alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
               code=mem.generated_code_size_in_bytes)
  total = (parts['arguments'] + parts['outputs'] - parts['alias'] + parts['temp'] +
           parts['code'])
  flops = float(cost.get('flops', math.nan)) if cost else math.nan
  report = dict(topology=topology, chip=topology.split(':')[0],
                devices_per_chip=devices_per_chip, **facts,
                **{f'{k}_gib': v / GIB for k, v in parts.items()}, total_gib=total / GIB,
                hbm_gib=hbm_gib, fits=total <= hbm_gib * GIB,
                tflops_per_chip=flops * devices_per_chip / 1e12,
                step_s_at_peak=flops / peak_flops)
  return report


def _fmt(value, spec, unit=''):
  return '-' if value is None or math.isnan(value) else f'{value:{spec}}{unit}'


def format_table(reports):
  """A markdown table of reports (one row each); '-' where XLA stopped before measuring."""
  head = ('| topology | batch | mesh | arguments | outputs (- donated) | temp | total | HBM | '
          'fits | TFLOP/chip | step at peak |')
  rows = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in reports:
    mesh = 'x'.join(f'{k}{v}' for k, v in r['mesh'].items())
    rows.append(
        f"| {r['topology']} | {r['batch_size']} | {mesh} | "
        f"{_fmt(r['arguments_gib'], '.2f', ' GiB')} | "
        f"{_fmt(r['outputs_gib'] - r['alias_gib'], '.2f', ' GiB')} | "
        f"{_fmt(r['temp_gib'], '.2f', ' GiB')} | {_fmt(r['total_gib'], '.2f', ' GiB')} | "
        f"{r['hbm_gib']:g} GiB | {'yes' if r['fits'] else 'NO'} | "
        f"{_fmt(r['tflops_per_chip'], '.3g')} | {_fmt(r['step_s_at_peak'] * 1e3, '.3g', ' ms')} |")
  return '\n'.join(rows)
