"""XLA flags of the test session (tests/conftest.py) and of the processes the tests start.

The suite's programs are tiny and compile-bound: LLVM at optimisation level 0 compiles them
with ~30% less CPU. Every comparison is between runs under the same flags; the slow
full-recipe run (tests/test_train.py) strips XLA_FLAGS and runs optimised, as `make train`.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def with_devices(n):
  """XLA_FLAGS for a process with n virtual CPU devices, compiled as the suite's."""
  return f'--xla_force_host_platform_device_count={n} {FAST_COMPILE}'
