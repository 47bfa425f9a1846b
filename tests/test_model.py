"""The model: every registered variant runs through it; per-layer seeds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
from configs import listops
from models import transformer
from tasks.base import Task
from train import step


def _task(head='classify', causal=False):
  return Task('t', vocab_size=20, seq_len=24, num_classes=5, head=head,
              causal=causal, sources=None, cls_token=True)


@pytest.mark.parametrize('kind', av.KINDS)
def test_every_kind_runs_with_padding(kind):
  config = listops.get_config('smoke')
  spec = config.attention.to_dict()
  spec['kind'] = kind
  model = step.build_model(config.model, spec, _task(), seed=0)
  batch = {'inputs': jnp.ones((2, 24), jnp.int32),
           'length': jnp.array([24, 7])}
  logits = model(batch, attention_rng=jax.random.key(0))
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))


def test_layers_get_distinct_seeds():
  spec = {'kind': 'bigbird', 'bigbird': {'seed': 3, 'block_size': 4}}
  assert transformer.layer_spec(spec, 2)['bigbird']['seed'] == 5
  assert transformer.layer_spec({'kind': 'full'}, 2) == {'kind': 'full'}


def test_bad_model_config():
  config = listops.get_config('smoke')
  config.model.pooling = 'max'
  with pytest.raises(ValueError, match='model.pooling'):
    step.build_model(config.model, config.attention.to_dict(), _task(),
                     seed=0)
