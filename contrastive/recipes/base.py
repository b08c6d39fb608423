"""What a recipe family implements: the `Recipe` that `train.py`, `validate.py`, `aot_report.py`
and `inference.py` call, and the `RefreshedTable` the loop keeps up to date.

A family is one module in `contrastive/recipes/` that builds a `Recipe` (docs/recipes.md lists
what each function receives and returns), plus its configs. The loop around it (mesh,
checkpoints, resume, preemption, the non-finite guard, evaluation cadence, metrics) and the one
jitted step (`step.update` with the family's `objectives.Objective`) are shared.
"""

import dataclasses
from typing import Any, Callable, Protocol

from contrastive import precision


@dataclasses.dataclass(frozen=True)
class Common:
  """The settings every family reads, resolved once (`common`); the defaults of fields a
  config may lack are here and nowhere else.

  Attributes:
    dtype: config.dtype ('float32' | 'bfloat16' | 'float64': contrastive/precision.py).
    compute_dtype: the towers' compute dtype (bfloat16, or None: the parameters').
    state_dtype: of every float leaf of the train state.
    remat: config.model.remat, a policy of models/compute.REMAT_POLICIES, or None.
    micro_batch_size: GradCache's config.grad_cache.micro_batch_size (0: off).
    nonfinite: config.nonfinite ('error' | 'skip': contrastive/faults.py).
  """
  dtype: str
  compute_dtype: Any
  state_dtype: Any
  remat: Any
  micro_batch_size: int
  nonfinite: str


def common(config):
  """The `Common` settings of a config."""
  dtype = config.get('dtype', 'float32')
  return Common(dtype=dtype, compute_dtype=precision.compute_dtype(dtype),
                state_dtype=precision.state_dtype(dtype),
                remat=config.model.get('remat') or None,
                micro_batch_size=int(config.get('grad_cache', {}).get('micro_batch_size', 0) or 0),
                nonfinite=config.get('nonfinite', 'error'))


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a run trains: the state, the jitted step and the evaluator.

  Attributes:
    state: `step.TrainState`, placed with its shardings (or abstract: ShapeDtypeStructs).
    step_fn: jitted fn(state, batch, rng) -> (state, metrics) (`step.jit_train_step`).
    evaluator: callable(state) -> {metric: value}, with `embed(state, side, items)` for
      the tables the loop refreshes from the towers (None when only compiling).
    model: the flax module.
  """
  state: Any
  step_fn: Callable
  evaluator: Any
  model: Any


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A recipe family's functions. `settings` is resolved once per run from the config (after
  `validate`); the other functions take what it returns.

  Attributes:
    name: the family's `config.family`.
    validate: fn(config) -> None; raises `config_lib.ConfigError` naming the field (or the
      data's MissingDatasetError) before anything is read or compiled.
    settings: fn(config) -> the family's frozen settings (its `config` attribute is the
      ConfigDict, for the fields read once where they are used).
    train_source: fn(settings, workdir) -> the training rows (a grain data source); may write
      what the run derives from its data to the workdir (a tokenizer).
    parts: fn(settings, mesh, source, steps, rng, *, clusters) -> `Parts`.
    loader: fn(settings, source, parts) -> (grain dataset of host batches, plan or None);
      the plan's `rows(step, seed)` are the rows of batch `step` (for the tables).
    tables: fn(settings, source, mesh, plan, steps) -> [RefreshedTable] the loop refreshes.
    abstract_parts: fn(settings, mesh, steps, rng) -> (abstract state, jitted step,
      {field: ShapeDtypeStruct} of a global batch); reads no more data than shapes need
      (compiling for other devices: contrastive/aot.py).
    load: fn(config, variables, workdir, step) -> the trained model for inference.
  """
  name: str
  validate: Callable
  settings: Callable
  train_source: Callable
  parts: Callable
  loader: Callable
  tables: Callable
  abstract_parts: Callable
  load: Callable


class RefreshedTable(Protocol):
  """A table of int32 rows that the loop recomputes from the current towers and the state
  keeps (so a resume restores it rather than recomputing): corpus-mined negatives
  (`negatives.corpus_index.CorpusIndex`), a batch plan's clusters or neighbours
  (`batching.periodic.PeriodicPlan`)."""

  field: str  # the TrainState field holding the table
  metric: str  # the prefix of its refresh-time metric

  def due(self, step: int) -> bool:
    """True if the table is recomputed before update `step + 1`."""

  def refresh(self, embed: Callable, state: Any, step: int) -> Any:
    """The state with the table recomputed; embed: fn(state, side, items) -> [n, D]."""

  def sync(self, state: Any, step: int) -> None:
    """Reads the table of a (restored) state."""

  def attach(self, batch: dict) -> dict:
    """This process's host batch with what the table adds to it."""

  def describe(self) -> str:
    """A line for the log."""
