"""`python -m contrastive.aot`: a config's full train step compiled for a TPU topology on this
CPU (libtpu from requirements-tpu.txt, which `make test` installs), its per-chip report, and
its one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from contrastive import aot_report

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _aot(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)  # the TPU devices come from the topology, not the host flag
  return subprocess.run([sys.executable, '-m', 'contrastive.aot', *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=REPO)


def test_summary_adds_up_and_says_when_it_does_not_fit(monkeypatch):
  compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(
      jax.ShapeDtypeStruct((256, 128), jnp.float32)).compile()
  r = aot_report.summarize(compiled, topology='v5e:2x2', batch_size=256, mesh={'data': 4})
  parts = r['arguments_gib'] + r['outputs_gib'] - r['alias_gib'] + r['temp_gib'] + r['code_gib']
  assert r['total_gib'] == pytest.approx(parts)
  assert r['arguments_gib'] * 2 ** 30 == 256 * 128 * 4
  assert r['tflops_per_chip'] * 1e12 >= 2 * 256 * 256 * 128  # the matmul, at least
  assert r['step_s_at_peak'] == pytest.approx(r['tflops_per_chip'] * 1e12 / 197e12)
  assert r['fits'] and r['hbm_gib'] == 16
  monkeypatch.setitem(aot_report.CHIPS, 'v5e', dict(hbm_gib=1e-6, peak_flops=197e12))
  r = aot_report.summarize(compiled, topology='v5e:2x2', batch_size=256, mesh={'data': 4})
  assert not r['fits']
  table = aot_report.format_table([r])
  assert '| v5e:2x2 | 256 | data4 |' in table and '| NO |' in table


def test_unknown_topology_is_a_one_line_error():
  with pytest.raises(aot_report.AotInputError, match='CHIP:SHAPE'):
    aot_report.topology_devices('v9:2x2')
  with pytest.raises(aot_report.AotInputError, match='CHIP:SHAPE'):
    aot_report.topology_devices('v5e')


def _has_libtpu():
  return bool(aot_report.jax_plugins())


NEEDS_LIBTPU = pytest.mark.skipif(not _has_libtpu(), reason='libtpu: pip install -r '
                                  'requirements-tpu.txt (make test installs it)')


@NEEDS_LIBTPU
def test_compiles_a_recipe_for_a_tpu_topology():
  """The SimCLR recipe's full step (augmentations, ResNet, loss, optimizer), compiled by
  XLA:TPU for a v5e 2x2 slice on this CPU: the table and JSON report, exit status 0; and a
  batch the mesh cannot split: exit status 2 before compiling."""
  out = _aot('--config', 'configs/simclr_fmnist.py:runlocal', '--topology', 'v5e:2x2')
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['chips'] == 4 and report['mesh'] == {'data': 4} and report['fits']
  assert 0 < report['total_gib'] < 1 and report['tflops_per_chip'] > 0
  assert '| v5e:2x2 | 64 | data4 |' in out.stdout


@pytest.mark.slow  # ~1 min of XLA:TPU compilation here; the parsing is tested below
@NEEDS_LIBTPU
def test_a_step_that_cannot_fit_exits_1():
  out = _aot('--config', 'configs/simclr_fmnist.py:runlocal', '--topology', 'v5e:2x2',
             '--config.batch_size=6')  # 6 rows do not split over 4 chips: before compiling
  assert out.returncode == 2 and 'batch_size=6' in out.stderr.strip().splitlines()[-1]
  """At a batch whose activations cannot fit 16 GiB, XLA:TPU refuses to compile: the report
  says how much it needed, and the exit status is 1."""
  out = _aot('--config', 'configs/simclr_fmnist.py:runlocal', '--topology', 'v5e:2x2',
             '--config.batch_size=262144', '--config.eval.batch_size=64')
  assert out.returncode == 1, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  # 65,536 rows per chip x 2 views x 28 x 28 x 32 channels of float32 activations alone
  # are 13 GiB; the backward pass keeps more.
  assert report['total_gib'] > 16 and report['xla_error'].startswith('RESOURCE_EXHAUSTED')
  assert '| v5e:2x2 | 262144 | data4 |' in out.stdout and '| NO |' in out.stdout
  assert 'more than the 16 GiB of a v5e device' in out.stderr


def test_out_of_memory_report():
  """XLA:TPU's refusal (the message it gave for the test above), as a report."""
  message = ('jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the '
             'total memory required for HLO temporaries (257.35G) exceeds available HBM '
             '(15.75G).')
  r = aot_report.out_of_memory(message, topology='v5e:2x2', batch_size=262144,
                               mesh={'data': 4}, chips=4, hosts=1)
  assert r['total_gib'] == pytest.approx(257.35) and not r['fits']
  assert r['xla_error'].startswith('RESOURCE_EXHAUSTED: Ran out of memory')
  row = aot_report.format_table([r]).splitlines()[-1]
  assert row.startswith('| v5e:2x2 | 262144 | data4 | - | - | 257.35 GiB | 257.35 GiB |')
