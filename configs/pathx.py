"""Path-X (LRA): Pathfinder at 128 x 128 = 16,384 tokens (or 256 x 256).

  python main.py --config=configs/pathx.py:cpu --workdir=runs/pathx \
      --config.attention.kind=local
The Pathfinder task (configs/pathfinder.py, tasks/pathfinder.py) at Path-X's
sizes, with Path-X's generator settings (thicker paddles, larger markers).
Presets: smoke (seconds, tests: a reduced 32 x 32 image with Path-X's
contour), cpu (128 x 128 with few images and a small model: proves the
path on 2 cores with a sub-quadratic kind; full attention at 16K tokens
needs tens of GB), lra (128 x 128, contour 14, 160K/20K/20K, LRA's
Pathfinder model and schedule; accelerators), lra256 (256 x 256 = 65,536
tokens; accelerators).
"""
from configs import default
from configs import pathfinder


def _smoke(c):
  pathfinder.smoke(c)
  c.task.update(contour_length=14)


def _cpu(c):
  c.task.update(image_size=128, contour_length=14, num_train=2_000,
                num_validation=200, num_test=200)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=8, num_steps=200, learning_rate=1e-3,
                 warmup_steps=20, eval_every=100, log_every=10,
                 checkpoint_every=100, eval_batch_size=8)


def _lra(c):
  pathfinder.lra(c)
  c.task.update(image_size=128)


def _lra256(c):
  pathfinder.lra(c)
  c.task.update(image_size=256)


def get_config(arg=None):
  return default.with_preset(
      pathfinder.base('pathx'), arg,
      {'smoke': _smoke, 'cpu': _cpu, 'lra': _lra, 'lra256': _lra256},
      default='cpu')
