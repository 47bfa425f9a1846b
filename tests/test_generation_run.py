"""End of training on a causal next-token task: continuations of test
prompts from the best checkpoint, scored into results.json, the texts in
generations.jsonl; the same from --mode=evaluate."""
import json
import os
import subprocess
import sys

import numpy as np

import tasks
from evaluate import generate as gen
from tasks import copy as copy_task
from tasks import lm
from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_continuation_cuts_prompt_and_reference():
  example = {'inputs': np.arange(1, 9), 'targets': np.arange(2, 10),
             'weights': np.array([0, 0, 1, 1, 1, 0, 0, 0], np.float32),
             'length': 8}
  prompt, ref = gen.continuation(example, 0, 0)  # to the first scored
  np.testing.assert_array_equal(prompt, [1, 2, 3])
  np.testing.assert_array_equal(ref, [4, 5, 6])
  prompt, ref = gen.continuation(example, 2, 4)
  np.testing.assert_array_equal(prompt, [1, 2])
  np.testing.assert_array_equal(ref, [3, 4, 5, 6])
  assert gen.continuation(example, 6, 4) is None  # past the example
  assert gen.continuation({**example, 'weights': np.zeros(8)}, 0, 0) is None


def test_copy_run_scores_the_second_half(smoke_config, tmp_path):
  config = smoke_config('copy')
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  block = gen.score_run(workdir)
  w = config.task.word_length
  assert block['num_prompts'] == 4 and block['new_tokens'] == w
  assert block['prompt_tokens'] == w + 2
  assert block['exact_match_tokens'] == w
  for name in ('bleu', 'chrf', 'rouge1', 'rouge2', 'rougeL', 'exact_match'):
    assert 0.0 <= block[name] <= 100.0
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['metrics']['test']['generation'] == block
  lines = _lines(os.path.join(workdir, 'generations.jsonl'))
  task = tasks.get(config.task, config.data_dir)
  test = task.source('test')
  for line in lines:
    example = test[line['index']]
    # The prompt is S w S; the reference is w, as symbol names.
    assert line['prompt'].split()[0] == 'S' == line['prompt'].split()[-1]
    want = example['inputs'][1:w + 1]
    assert line['reference'] == ' '.join(
        copy_task.token_name(int(t)) for t in want)
    assert len(line['generated'].split()) == w


def test_lm_train_then_evaluate_from_the_command_line(data_dir, tmp_path):
  workdir = str(tmp_path / 'lm')
  args = ['--config=configs/lm.py:smoke', f'--workdir={workdir}',
          f'--config.data_dir={data_dir}']
  done = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'generation: 4 test prompts, BLEU' in done.stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    block = json.load(f)['metrics']['test']['generation']
  assert block['prompt_tokens'] == 32 and block['new_tokens'] == 16
  assert block['decoding'] == 'decoded'
  lines = _lines(os.path.join(workdir, 'generations.jsonl'))
  assert len(lines) == 4
  task = tasks.get(tasks.get_config('lm', 'smoke').task, data_dir)
  example = task.source('test')[lines[0]['index']]
  assert lines[0]['prompt'] == lm.decode(example['inputs'][:32])
  assert lines[0]['reference'] == lm.decode(example['targets'][31:47])
  # --mode=evaluate rewrites results.json, generation included.
  os.remove(os.path.join(workdir, 'generations.jsonl'))
  again = subprocess.run([sys.executable, 'main.py', '--mode=evaluate',
                          f'--workdir={workdir}'], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    again_block = json.load(f)['metrics']['test']['generation']
  timing = ('tokens_per_sec',)
  assert ({k: v for k, v in again_block.items() if k not in timing}
          == {k: v for k, v in block.items() if k not in timing})
  assert _lines(os.path.join(workdir, 'generations.jsonl')) == lines
