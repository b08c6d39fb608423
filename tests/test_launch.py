"""Launch scripts print the right commands under --dry-run; distributed start-up is a no-op
for a single process."""

import os
import subprocess

import pytest

from contrastive import distributed

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
SCRIPTS = ('tpu_pod.sh', 'slurm_gpu.sh', 'local_multiprocess.sh')
TPU_ENV = dict(TPU_NAME='simclr', ZONE='us-central2-b', PROJECT='proj', ACCELERATOR_TYPE='v4-32',
               WORKDIR='gs://bucket/run', NUM_WORKERS='2')


def dry_run(script, *args, **env):
  """Runs `script --dry-run ARGS` with only `env` (AOT_CHECK=0 unless given; None: unset)."""
  env = {k: v for k, v in dict(dict(PATH=os.environ['PATH'], HOME=os.environ.get('HOME', '/tmp'),
                                    AOT_CHECK='0'), **env).items() if v is not None}
  out = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--dry-run', *args],
                       capture_output=True, text=True, timeout=30, env=env)
  return out.returncode, out.stdout.splitlines(), out.stderr


def fake_python(tmp_path, status=0):
  """A `python` first on PATH that records its arguments (one per line) and exits `status`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  shim = bin_dir / 'python'
  shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/python_args\nexit {status}\n')
  shim.chmod(0o755)
  return f'{bin_dir}:{os.environ["PATH"]}', tmp_path / 'python_args'


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_strict_and_parse(script):
  path = os.path.join(REPO, 'launch', script)
  with open(path) as f:
    assert 'set -euo pipefail' in f.read()
  assert subprocess.run(['bash', '-n', path]).returncode == 0


@pytest.mark.parametrize('script, var', [('tpu_pod.sh', 'TPU_NAME'), ('slurm_gpu.sh', 'CONFIG'),
                                         ('local_multiprocess.sh', 'CONFIG')])
def test_missing_variables_stop_with_their_name(script, var):
  rc, lines, err = dry_run(script)
  assert rc != 0 and f'set {var}' in err and not lines


def test_tpu_pod_dry_run():
  rc, lines, err = dry_run('tpu_pod.sh', 'all', '--config.batch_size=8192', **TPU_ENV)
  assert rc == 0, err
  assert lines[0].startswith('gcloud compute tpus queued-resources create simclr-qr')
  assert '--accelerator-type=v4-32' in lines[0] and '--node-id=simclr' in lines[0]
  ssh = [l for l in lines if ' ssh simclr --worker=all ' in l]
  assert len(ssh) == 3  # clean the old copy, install, train
  assert any(' scp --recurse --worker=all ' in l for l in lines)
  assert 'make install && pip install -r requirements-tpu.txt' in ssh[1]
  assert "pip install -U 'jax[tpu]'" not in ssh[1] and 'install -U' not in ssh[1]
  train = ssh[2]
  assert ('python -m contrastive.main --config=configs/simclr_fmnist.py:resnet50 '
          '--workdir=gs://bucket/run --distributed=on') in train
  assert '--config.batch_size=8192' in train and '> ~/contrastive-train.log' in train
  rc, lines, _ = dry_run('tpu_pod.sh', 'logs', **TPU_ENV)
  assert rc == 0 and [l.split()[-1] for l in lines[1:]] == [
      'logs/simclr/worker-0.log', 'logs/simclr/worker-1.log']
  rc, lines, _ = dry_run('tpu_pod.sh', 'delete', **TPU_ENV)
  assert rc == 0 and lines[0].startswith('gcloud compute tpus queued-resources delete simclr-qr')


def tpu_topology(accelerator_type):
  out = subprocess.run(['bash', '-c', 'source launch/common.sh && tpu_topology "$0"',
                        accelerator_type], cwd=REPO, capture_output=True, text=True, timeout=30)
  return out.stdout.strip() if out.returncode == 0 else None


@pytest.mark.parametrize('accelerator_type, topology', [
    ('v4-8', 'v4:2x2x1'), ('v4-16', 'v4:2x2x2'), ('v4-32', 'v4:2x2x4'), ('v4-64', 'v4:2x4x4'),
    ('v4-128', 'v4:4x4x4'), ('v4-256', 'v4:4x4x8'), ('v4-4096', 'v4:8x16x16'),
    ('v5p-8', 'v5p:2x2x1'), ('v5p-16', 'v5p:2x2x2'), ('v5p-128', 'v5p:4x4x4'),
    ('v5litepod-1', 'v5e:1x1'), ('v5litepod-8', 'v5e:2x4'), ('v5litepod-16', 'v5e:4x4'),
    ('v5litepod-64', 'v5e:8x8'), ('v5litepod-256', 'v5e:16x16'),
    ('v6e-4', 'v6e:2x2'), ('v6e-16', 'v6e:4x4'), ('v6e-32', 'v6e:4x8'),
    ('v4-24', None), ('v3-8', None), ('v4', None), ('v4-2', None), ('v6e-x', None),
])
def test_tpu_topology(accelerator_type, topology):
  assert tpu_topology(accelerator_type) == topology


def test_tpu_pod_dry_run_runs_the_aot_check_first(tmp_path):
  path, args_file = fake_python(tmp_path)
  env = dict(TPU_ENV, PATH=path, AOT_CHECK='1', DATASET_FLAGS='--config.dataset.name=cifar10')
  rc, lines, err = dry_run('tpu_pod.sh', 'all', '--config.batch_size=8192', **env)
  assert rc == 0, err
  assert lines[0].startswith('# compile-only check on this machine')
  assert lines[1].startswith('gcloud compute tpus queued-resources create simclr-qr')
  assert args_file.read_text().splitlines() == [
      '-m', 'contrastive.aot', '--config=configs/simclr_fmnist.py:resnet50',
      '--topology=v4:2x2x4', '--config.dataset.name=cifar10', '--config.batch_size=8192']
  # `train` too; TOPOLOGY overrides the mapping; the default under --dry-run is to check.
  rc, lines, err = dry_run('tpu_pod.sh', 'train',
                           **dict(TPU_ENV, PATH=path, TOPOLOGY='v4:4x4x4', AOT_CHECK=None))
  assert rc == 0, err
  assert '--topology=v4:4x4x4' in args_file.read_text().splitlines()
  assert ' ssh simclr --worker=all ' in lines[1] and 'contrastive.main' in lines[1]


@pytest.mark.parametrize('status', [1, 2])
def test_tpu_pod_stops_when_the_aot_check_fails(tmp_path, status):
  path, args_file = fake_python(tmp_path, status=status)
  rc, lines, err = dry_run('tpu_pod.sh', 'all', **dict(TPU_ENV, PATH=path, AOT_CHECK='1'))
  assert rc == status and args_file.exists()
  assert len(lines) == 1 and lines[0].startswith('# compile-only check')  # nothing else ran
  assert ('does not fit v4:2x2x4' if status == 1 else 'contrastive.aot failed (exit 2)') in err


def test_tpu_pod_aot_check_is_skipped_with_aot_check_0(tmp_path):
  path, args_file = fake_python(tmp_path)
  rc, lines, err = dry_run('tpu_pod.sh', 'train', **dict(TPU_ENV, PATH=path))  # AOT_CHECK=0
  assert rc == 0, err
  assert not args_file.exists() and len(lines) == 1 and 'contrastive.main' in lines[0]
  # An accelerator type without a known topology stops the check, not the skipped one.
  rc, _, err = dry_run('tpu_pod.sh', 'train', **dict(TPU_ENV, PATH=path, AOT_CHECK='1',
                                                      ACCELERATOR_TYPE='v3-8'))
  assert rc == 2 and 'set TOPOLOGY' in err and not args_file.exists()


def test_slurm_dry_run():
  rc, lines, err = dry_run('slurm_gpu.sh', '--config.total_steps=3', CONFIG='c.py:runlocal',
                           WORKDIR='/shared/run', NODES='4', GPUS_PER_NODE='8')
  assert rc == 0, err
  assert lines[0] == 'mkdir -p /shared/run/logs'
  sbatch = lines[1]
  for part in ('sbatch ', '--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8',
               '--signal=TERM@300', '--requeue', 'srun ', '--output=/shared/run/logs/%x-%j-node%t.log',
               'python -m contrastive.main --config=c.py:runlocal --workdir=/shared/run '
               '--distributed=auto --config.total_steps=3'):
    assert part in sbatch, part


def test_local_multiprocess_dry_run():
  rc, lines, err = dry_run('local_multiprocess.sh', '--config.total_steps=3',
                           CONFIG='c.py:runlocal', WORKDIR='/tmp/run', NUM_PROCESSES='2',
                           DEVICES_PER_PROCESS='4', PORT='4321')
  assert rc == 0, err
  assert lines[0] == 'mkdir -p /tmp/run/logs' and lines[-1] == 'wait'
  procs = lines[1:-1]
  assert len(procs) == 2
  for i, line in enumerate(procs):
    assert line.startswith('env JAX_PLATFORMS=cpu '
                           'XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m '
                           'contrastive.main --config=c.py:runlocal --workdir=/tmp/run')
    assert (f'--coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={i} '
            f'--config.total_steps=3 > /tmp/run/logs/process-{i}.log 2>&1 &') in line


@pytest.mark.parametrize('env, expected', [
    ({}, None),
    ({'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}, None),  # a single-task allocation
    ({'SLURM_NTASKS': '4', 'SLURM_PROCID': '2'}, 'slurm'),
    ({'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:1234'}, 'ompi'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'env'),
])
def test_detect_cluster(env, expected):
  assert distributed.detect_cluster(env) == expected


def test_initialize_is_a_no_op_for_one_process():
  assert not distributed.initialize('auto', env={})
  assert not distributed.initialize('off', env={'SLURM_NTASKS': '4', 'SLURM_PROCID': '0'})
  assert not distributed.initialize(coordinator_address='127.0.0.1:1', num_processes=1,
                                    process_id=0, env={})
  with pytest.raises(ValueError, match='all of --coordinator_address'):
    distributed.initialize(coordinator_address='127.0.0.1:1', env={})
  with pytest.raises(ValueError, match="--distributed='maybe'"):
    distributed.initialize('maybe')
