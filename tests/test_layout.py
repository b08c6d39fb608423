"""The package's shape: no import cycle (lazy imports inside functions count), no module over
400 lines, and the recipe family looked up in one place."""

import ast
import os
import re

import pytest

from contrastive import recipes
from contrastive.batching import periodic
from contrastive.negatives import corpus_index

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'contrastive')


def _modules():
  """{'contrastive.x.y': path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
  return out


def _imports(path, modules):
  """The package modules `path` imports anywhere in its code (`from a import b` counts b if
  it is a module, else a)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        found.add(full if full in modules else node.module)
  return {m for m in found if m in modules}


def find_cycle(graph):
  """A list of modules forming an import cycle of `graph` ({module: imported}), or None.
  A package's __init__ importing its own submodules is not an arrow back (it is how the
  package exposes them), so `contrastive.x` -> `contrastive.x.y` edges are skipped."""
  edges = {m: {n for n in deps if not n.startswith(m + '.')} for m, deps in graph.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(edges.get(m, ())):
      if state.get(n) == 'open':
        return stack[stack.index(n):] + [n]
      if n not in state:
        cycle = visit(n)
        if cycle:
          return cycle
    stack.pop()
    state[m] = 'done'
    return None

  for m in sorted(edges):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_lazy_cycle_and_accepts_a_tree():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'p': {'p.x'}, 'p.x': set()}) is None  # a package exposing its module


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(path, modules) - {m} for m, path in modules.items()}
  assert len(graph) > 50 and graph['contrastive.train']  # the parse sees the package
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_no_module_over_400_lines():
  long = {m: n for m, path in _modules().items()
          if (n := sum(1 for _ in open(path, encoding='utf-8'))) > 400}
  assert not long, long


def test_the_family_is_looked_up_once():
  """`config.family` is compared nowhere but in `recipes.get`."""
  hits = []
  for m, path in _modules().items():
    for i, line in enumerate(open(path, encoding='utf-8'), 1):
      if re.search(r"family\W*(==|!=)|['\"](two_tower|image_views)['\"]\s*(==|!=|in\b)", line):
        hits.append(f'{m}:{i}')
  assert not hits, hits


@pytest.mark.parametrize('table', [corpus_index.CorpusIndex, periodic.PeriodicPlan])
def test_refreshed_tables_implement_the_protocol(table):
  for name in ('field', 'metric', 'due', 'refresh', 'sync', 'attach', 'describe'):
    assert hasattr(table, name), name


def test_every_family_implements_the_recipe():
  for name, recipe in recipes.RECIPES.items():
    assert recipe.name == name
    for field in ('validate', 'settings', 'train_source', 'parts', 'loader', 'tables',
                  'abstract_parts', 'load'):
      assert callable(getattr(recipe, field)), (name, field)
