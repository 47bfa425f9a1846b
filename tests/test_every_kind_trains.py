"""Every registered variant trains end to end on every task (smoke presets).

Opt-in (about a minute per task on 2 cores): pytest -m slow
"""
import pytest

import attention_variants as av
import tasks
from train import trainer


@pytest.mark.slow
@pytest.mark.parametrize('task', tasks.NAMES)
@pytest.mark.parametrize('kind', av.KINDS)
def test_trains(smoke_config, tmp_path, task, kind):
  config = smoke_config(task, attention__kind=kind)
  results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['attention']['kind'] == kind
  assert results['steps'] == config.train.num_steps
  assert 0.0 <= results['metrics']['test']['accuracy'] <= 1.0
