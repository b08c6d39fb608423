"""The notebooks run top to bottom on CPU (no outputs are stored in the repository)."""

import glob
import os

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), '..', 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))


def test_there_are_notebooks():
  assert NOTEBOOKS


# Executing them takes ~80 s: `make test-all` (CI keeps the suite under 10 min).
@pytest.mark.parametrize('path', [pytest.param(p, marks=pytest.mark.slow) for p in NOTEBOOKS],
                         ids=os.path.basename)
def test_notebook_executes(path, monkeypatch):
  # The kernel inherits this environment: no display, CPU (and conftest's 8 virtual devices).
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError, with the failing cell's traceback
