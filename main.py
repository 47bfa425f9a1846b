"""Train, evaluate, benchmark or compare attention variants.

  python main.py --config=configs/listops.py:cpu --workdir=runs/listops \
      --config.attention.kind=local --config.attention.local.window=32

Modes (--mode):
  train     (default) train, validate, test the best checkpoint, write
            results.json; rerunning the same command resumes. Tasks with a
            `generation` block (lm, copy) then generate continuations of
            test prompts and add BLEU, chrF, ROUGE and exact match
            (RUN/generations.jsonl holds the texts).
  evaluate  re-evaluate a finished run's best checkpoint on test (and its
            generation) and rewrite its results.json: --mode=evaluate
            --workdir=RUN (no --config).
  benchmark time and peak memory of every attention kind against
            jax.nn.dot_product_attention: --config=configs/benchmark.py.
  compare   the variants x tasks x seeds sweep with its tables and plots:
            --config=configs/compare.py:<preset>.
  baselines what a classification task scores without attention (majority
            class, logistic regression on the raw tokens, on their
            histogram and on their trigrams):
            --config=configs/<task>.py:<preset>.
  visualize attention heatmaps of a run's best checkpoint, with where each
            head looks (RUN/maps): --mode=visualize --workdir=RUN, and
            optionally --config=configs/visualize.py --config.examples=0,3
            (the run's own config builds the model).

Several processes (a TPU pod slice, GPU hosts): the same command on every
process; jax.distributed starts from the environment (SLURM, Cloud TPU) or
from --coordinator=HOST:PORT --num_processes=N --process_id=I
(utils/distributed.py), and config.mesh lays the run over all their
devices. Only --mode=train runs over several processes; process 0 logs
and writes the run's files. docs/cloud_tpu.md has the recipes.

Exit status: 0 done (or stopped by --max_steps_this_run); 1 an error the
user can fix, printed as one line starting with 'error:'; 143 (128 +
SIGTERM) preempted: a checkpoint was saved and rerunning the same command
resumes; 130 interrupted by Ctrl-C (resumes from the last checkpoint).
"""
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from utils import distributed

MODES = ('train', 'evaluate', 'benchmark', 'compare', 'baselines',
         'visualize')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. configs/listops.py:cpu; '
    'override fields with --config.<field>=<value>.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory: config.json, metrics.jsonl, TensorBoard '
    'events, checkpoints, results.json.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    'keep_freed_memory', True, "Keep freed host memory in glibc's heap for "
    'reuse (no per-step mmap/munmap of large CPU buffers; faster on CPU, at '
    'the cost of holding the peak resident memory); see utils/host_memory.py.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'HOST:PORT of process 0, for a run over several '
    'processes (with --num_processes and --process_id; the same on all).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'How many processes the run has (with '
    '--coordinator).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "This process's index, 0 to --num_processes - 1.")
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Start jax.distributed with its own detection of '
    'the cluster even where the environment names none (SLURM and '
    'multi-host Cloud TPU are detected without it).')
_STEPS_THIS_RUN = flags.DEFINE_integer(
    'max_steps_this_run', None, 'Stop (checkpointed) after this many steps, '
    'as a preemption would; rerun to resume.')

# Errors a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED = 1, 130, 143


def run(mode, config, workdir):
  if mode == 'train':
    from train import trainer
    results = trainer.train_and_evaluate(
        config, workdir, max_steps_this_run=_STEPS_THIS_RUN.value)
    if results is not None and 'generation' not in results['metrics']['test']:
      if distributed.multi_process():
        logging.info('generation is scored on one process: run --mode=evaluate '
                     '--workdir=%s there', workdir)
      else:
        score_generation(workdir)
  elif mode == 'evaluate':
    from train import trainer
    trainer.evaluate_run(workdir)
    score_generation(workdir)
  elif mode == 'benchmark':
    from evaluate import benchmark
    benchmark.run(config, workdir)
  elif mode == 'compare':
    from evaluate import compare
    compare.run(config, workdir)
  elif mode == 'baselines':
    from evaluate import baselines
    baselines.run(config, workdir)
  elif mode == 'visualize':
    from evaluate import visualize
    if config is None:
      from configs import visualize as visualize_config
      config = visualize_config.get_config()
    visualize.run(config, workdir)


def start_processes(mode):
  """jax.distributed over several processes when the flags or the
  environment ask for it; only process 0 logs progress."""
  flags_given = distributed.check_flags(_COORDINATOR.value,
                                        _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not (flags_given or distributed.cluster() or _DISTRIBUTED.value):
    return
  if mode != 'train':
    raise ValueError(f'--mode={mode} runs in one process; run it without '
                     '--coordinator/--num_processes/--process_id/--distributed '
                     '(and outside srun or a multi-host slice)')
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, force=_DISTRIBUTED.value)
  if not distributed.is_main():
    logging.set_verbosity(logging.WARNING)


def score_generation(workdir):
  """A finished run of a task with config.generation (lm, copy): its test
  prompts' continuations, scored into results.json (evaluate/generate.py)."""
  from evaluate import generate
  generate.score_run(workdir)


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's and XLA's per-save INFO chatter out of the progress log."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or
            not any(p in record.pathname for p in ('orbax', 'xla_bridge')))


def fail(message: str, status: int = EXIT_ERROR):
  logging.flush()
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def parse_flags(argv):
  """absl flag parsing whose config errors end in one line."""
  try:
    args = flags.FLAGS(argv)
    if _CONFIG.value is not None:  # a failed load surfaces on first use
      _CONFIG.value.keys()
    return args
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError,
          OSError, SyntaxError, NameError, ImportError) as e:
    from configs import cli
    fail(cli.explain(e, argv))


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected argument(s) {" ".join(argv[1:])!r}: every setting is a '
         'flag (--config=..., --workdir=..., --config.<field>=...)')
  if _CONFIG.value is None and _MODE.value not in ('evaluate', 'visualize'):
    fail('--config is required, e.g. --config=configs/listops.py:cpu')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _KEEP_FREED_MEMORY.value:
    from utils import host_memory
    host_memory.keep_freed_memory()
  from train import trainer
  try:
    start_processes(_MODE.value)
    run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    fail(str(e))
  except trainer.Preempted as e:
    logging.flush()
    print(f'preempted: {e} (exit status {EXIT_PREEMPTED})', file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  except KeyboardInterrupt:
    fail('interrupted (Ctrl-C); rerun the same command to resume from the '
         'last checkpoint', EXIT_INTERRUPTED)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
