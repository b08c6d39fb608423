"""Test-session setup: 8 virtual CPU devices, so meshes of 1, 2 and 8 devices fit in one process.

XLA reads the flag once, when jax first initialises its backend, so it is set here, before
any test module imports jax. Meshes over `jax.devices()[:n]` then give the 1-, 2- and 8-device
runs that the distributed tests compare.
"""

import os
import sys

NUM_TEST_DEVICES = 8

if 'jax' in sys.modules:
  raise RuntimeError('jax was imported before tests/conftest.py could set the device count.')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={NUM_TEST_DEVICES}').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
