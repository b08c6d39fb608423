"""Config files (`configs/*.py` with `get_config(arg)`) loaded by path as config_flags does,
and `ConfigError`, the one error of an invalid config field."""

import importlib.util
import os


class ConfigError(ValueError):
  """A config field is invalid; the message names the field and the fix. `contrastive.main`
  reports it in one line, wherever it is raised (checks before compiling, or later ones that
  need the data or another workdir)."""


def load_module(path):
  """The config file at `path` as a module."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file, name):
  """The config module `name` (e.g. 'simclr_fmnist.py') next to `config_file` (a __file__)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def load_config(path, arg=None):
  """get_config(arg) of the config file at `path`."""
  return load_module(path).get_config(arg)


def section(config, name, defaults):
  """config.<name> as a dict with `defaults` filled in (a config without the field: defaults);
  raises ConfigError naming any field `defaults` does not know."""
  cfg = dict(defaults, **dict(config.get(name) or {}))
  unknown = set(cfg) - set(defaults)
  if unknown:
    raise ConfigError(f'config.{name}: unknown field(s) {sorted(unknown)}; known: '
                      f'{sorted(defaults)}.')
  return cfg
