"""Every registered variant trains end to end on every task (smoke presets).

A bidirectional-only kind (nystromformer, linformer) on a causal task (Task.causal:
MQAR, copy) fails instead, with its one clear ValueError.

Opt-in (about a minute per task on 2 cores): pytest -m slow
"""
import pytest

import attention_variants as av
import tasks
from train import trainer

# Kinds that have no causal form and reject causal attention.
BIDIRECTIONAL_ONLY = ('nystromformer', 'linformer')


@pytest.mark.slow
@pytest.mark.parametrize('task', tasks.NAMES)
@pytest.mark.parametrize('kind', av.KINDS)
def test_trains(smoke_config, tmp_path, task, kind):
  config = smoke_config(task, attention__kind=kind)
  if (kind in BIDIRECTIONAL_ONLY
      and tasks.get(config.task, config.data_dir).causal):
    with pytest.raises(ValueError, match=f'{kind} is bidirectional only'):
      trainer.train_and_evaluate(config, str(tmp_path / 'run'))
    return
  results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['attention']['kind'] == kind
  assert results['steps'] == config.train.num_steps
  assert 0.0 <= results['metrics']['test']['accuracy'] <= 1.0
