"""Cloud TPU launcher: prints (--dry_run) or runs the gcloud commands that
create a TPU VM or pod slice, copy this checkout to every worker, install the
pinned requirements and the TPU jaxlib, mount a Cloud Storage bucket with
Cloud Storage FUSE, and start the same `main.py` command on every worker.

The commands are one bash script, built here: --dry_run prints it, a real run
hands the very same text to bash. docs/cloud_tpu.md shows this script's dry
runs (`--update_doc` rewrites them; tests/test_scripts.py checks they match).

Usage:

  # Spot capacity through a queued resource, every step, printed only:
  python scripts/cloud_tpu.py --name=attn-v5e --zone=us-west4-a \\
    --accelerator_type=v5litepod-16 --runtime_version=v2-alpha-tpuv5-lite \\
    --bucket=my-bucket --spot --config=configs/listops.py:lra \\
    --extra=--config.mesh.data=-1 --dry_run

  # The same, run (needs gcloud on PATH, authenticated, a default project):
  python scripts/cloud_tpu.py ... (same flags, without --dry_run)

  # Resume loop after preemption: rerun the training command until it exits
  # 0; when the queued resource is no longer ACTIVE (Spot preemption), delete
  # it, queue it again, set the workers up again and rerun the same command:
  python scripts/cloud_tpu.py ... --spot --resume

  # Only some steps (create, wait, copy, install, mount, launch):
  python scripts/cloud_tpu.py ... --steps=launch

  # Rewrite docs/cloud_tpu.md's examples from this script's dry runs:
  python scripts/cloud_tpu.py --update_doc docs/cloud_tpu.md

--workdir defaults to /mnt/gcs/runs/NAME and the data dir to /mnt/gcs/tfds,
both on the bucket's mount (the project reads and writes local paths; gs://
paths are not supported). Exit status: that of the script (0 done), 1 with one
`error:` line for a bad flag or a missing gcloud.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOUNT = '/mnt/gcs'
REMOTE_DIR = 'efficient-attention'
ARCHIVE = '/tmp/efficient-attention.tar.gz'
STEPS = ('create', 'wait', 'copy', 'install', 'mount', 'launch')
# Exit statuses of the training command that the resume loop does not retry:
# 0 is a finished run, 1 is main.py's one-line error (a retry changes
# nothing). 143 (SIGTERM: preempted, checkpoint saved), 255 (ssh lost its
# worker) and any other status are retried.
FINAL_STATUSES = (0, 1)


class UsageError(Exception):
  """A bad flag value: reported as one `error:` line."""


class Parser(argparse.ArgumentParser):
  """argparse, with a bad flag as one `error:` line and exit status 1."""

  def error(self, message):
    raise UsageError(message)


def parse_flags(argv):
  """The launcher's flags, checked."""
  p = Parser(prog='cloud_tpu.py', description=__doc__.split('\n\n')[0])
  p.add_argument('--name', required=True, help='TPU (and queued resource) name')
  p.add_argument('--zone', required=True, help='e.g. us-west4-a')
  p.add_argument('--accelerator_type', required=True, help='e.g. v5litepod-16')
  p.add_argument('--runtime_version', required=True,
                 help='TPU software version, e.g. v2-alpha-tpuv5-lite')
  p.add_argument('--bucket', required=True,
                 help='Cloud Storage bucket name (no gs://), mounted at ' + MOUNT)
  p.add_argument('--spot', action='store_true',
                 help='Spot capacity through a queued resource')
  p.add_argument('--config', required=True,
                 help='main.py --config, e.g. configs/listops.py:lra')
  p.add_argument('--workdir', default=None,
                 help='main.py --workdir (default %s/runs/NAME)' % MOUNT)
  p.add_argument('--data_dir', default=MOUNT + '/tfds',
                 help='main.py --config.data_dir (default %(default)s)')
  p.add_argument('--extra', action='append', default=[],
                 help='one more main.py flag, e.g. --config.mesh.data=-1; '
                 'repeatable')
  p.add_argument('--steps', default=','.join(STEPS),
                 help='comma-separated subset of ' + ','.join(STEPS))
  p.add_argument('--resume', action='store_true',
                 help='after the steps, rerun the training command until it '
                 'exits 0 (re-creating a preempted Spot queued resource)')
  p.add_argument('--max_attempts', type=int, default=20,
                 help='runs of the training command in --resume mode')
  p.add_argument('--dry_run', action='store_true',
                 help='print the commands instead of running them')
  args = p.parse_args(argv)
  check_flags(args)
  return args


def check_flags(args):
  """Values argparse cannot check by itself."""
  if not re.fullmatch(r'[a-z]([-a-z0-9]*[a-z0-9])?', args.name):
    raise UsageError('--name=%s: use lower-case letters, digits and hyphens, '
                     'starting with a letter' % args.name)
  if args.bucket.startswith('gs://') or '/' in args.bucket:
    raise UsageError('--bucket=%s: give the bare bucket name (it is mounted '
                     'at %s with gcsfuse)' % (args.bucket, MOUNT))
  steps = args.steps.split(',')
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise UsageError('--steps: unknown step %s; valid: %s'
                     % (','.join(unknown), ','.join(STEPS)))
  args.steps = [s for s in STEPS if s in steps]
  if 'wait' in args.steps and not args.spot:
    args.steps.remove('wait')  # tpu-vm create returns once the TPU is READY
  if args.workdir is None:
    args.workdir = '%s/runs/%s' % (MOUNT, args.name)
  for path, flag in ((args.workdir, '--workdir'), (args.data_dir, '--data_dir')):
    if path.startswith('gs://'):
      raise UsageError('%s=%s: gs:// paths are not supported; use the bucket '
                       'through its mount, e.g. %s/...' % (flag, path, MOUNT))
  if args.max_attempts < 1:
    raise UsageError('--max_attempts must be at least 1')
  if not re.fullmatch(r'[^:\s]+\.py(:\w+)?', args.config):
    raise UsageError('--config=%s: expected configs/<task>.py[:<preset>]'
                     % args.config)


def pinned_jax():
  """The jax version requirements.txt pins (the TPU jaxlib must match)."""
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    match = re.search(r'^jax==(\S+)$', f.read(), re.M)
  if not match:
    raise UsageError('requirements.txt pins no jax==VERSION')
  return match.group(1)


def quote(word):
  """A shell word; `--flag=value` keeps its flag outside the quotes."""
  match = re.fullmatch(r'(--[\w.-]+=)(.*)', word, re.S)
  if match and shlex.quote(match.group(2)) != match.group(2):
    return match.group(1) + shlex.quote(match.group(2))
  return shlex.quote(word)


def join(words):
  """One shell command line."""
  return ' '.join(quote(w) for w in words)


def ssh_all(args, remote):
  """The same remote command on every worker of the TPU."""
  return join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name,
               '--zone=' + args.zone, '--worker=all', '--command=' + remote])


def create_command(args):
  """Queued resource with --spot, else a TPU VM created at once."""
  if args.spot:
    return join(['gcloud', 'compute', 'tpus', 'queued-resources', 'create',
                 args.name, '--node-id=' + args.name, '--zone=' + args.zone,
                 '--accelerator-type=' + args.accelerator_type,
                 '--runtime-version=' + args.runtime_version, '--spot'])
  return join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name,
               '--zone=' + args.zone,
               '--accelerator-type=' + args.accelerator_type,
               '--version=' + args.runtime_version])


def state_command(args):
  """Prints the queued resource's state (ACTIVE once the TPU is up)."""
  return join(['gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
               args.name, '--zone=' + args.zone,
               '--format=value(state.state)'])


def delete_command(args):
  """Deletes the queued resource and its TPU (after a preemption)."""
  return join(['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
               args.name, '--zone=' + args.zone, '--force', '--quiet'])


def wait_function(args):
  """A bash function that polls the queued resource until it is ACTIVE."""
  return '\n'.join([
      'wait_active() {',
      '  while true; do',
      '    state=$(%s)' % state_command(args),
      '    case "$state" in',
      '      ACTIVE) return 0 ;;',
      '      FAILED|SUSPENDED) echo "error: queued resource %s is $state" >&2;'
      ' return 1 ;;' % args.name,
      '    esac',
      '    sleep 60',
      '  done',
      '}'])


def copy_commands(args):
  """This checkout's HEAD as a tarball, on every worker."""
  return ['git -C "$REPO" ' + join(['archive', '--format=tar.gz',
                                    '--prefix=%s/' % REMOTE_DIR, '-o',
                                    ARCHIVE, 'HEAD']),
          join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', ARCHIVE,
                args.name + ':', '--zone=' + args.zone, '--worker=all'])]


def install_command(args):
  """Python 3.11 venv with the pinned requirements and the TPU jaxlib."""
  remote = ' && '.join([
      'sudo apt-get update',
      'sudo apt-get install -y python3.11 python3.11-venv',
      'rm -rf %s' % REMOTE_DIR,
      'tar -xzf %s' % os.path.basename(ARCHIVE),
      'cd %s' % REMOTE_DIR,
      'python3.11 -m venv .venv',
      '.venv/bin/pip install -r requirements.txt',
      '.venv/bin/pip install "jax[tpu]==%s"' % pinned_jax()])
  return ssh_all(args, remote)


def mount_command(args):
  """gcsfuse from Google's apt repository; the bucket at MOUNT."""
  remote = ' && '.join([
      'export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s)',
      'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
      'https://packages.cloud.google.com/apt $GCSFUSE_REPO main" '
      '| sudo tee /etc/apt/sources.list.d/gcsfuse.list',
      'curl https://packages.cloud.google.com/apt/doc/apt-key.gpg '
      '| sudo tee /usr/share/keyrings/cloud.google.asc',
      'sudo apt-get update',
      'sudo apt-get install -y fuse gcsfuse',
      'sudo mkdir -p %s' % MOUNT,
      'sudo chown $USER %s' % MOUNT,
      '(mountpoint -q {m} || gcsfuse --implicit-dirs --rename-dir-limit=200000'
      ' {b} {m})'.format(m=MOUNT, b=args.bucket)])
  return ssh_all(args, remote)


def train_words(args):
  """The main.py command every worker runs. --distributed: jax.distributed
  asks the TPU VM's metadata for the slice's workers (a GCE TPU VM sets no
  environment variable main.py could see; utils/distributed.py)."""
  return (['.venv/bin/python', 'main.py', '--config=' + args.config,
           '--workdir=' + args.workdir, '--config.data_dir=' + args.data_dir,
           '--distributed'] + list(args.extra))


def launch_command(args):
  """Training on every worker, from the unpacked checkout."""
  return ssh_all(args, 'cd %s && %s' % (REMOTE_DIR, join(train_words(args))))


def step_lines(args, step):
  """The commands of one step, each followed by a stop on failure."""
  if step == 'create':
    return [create_command(args) + ' || exit 1']
  if step == 'wait':
    return ['wait_active || exit 1']
  if step == 'copy':
    return [c + ' || exit 1' for c in copy_commands(args)]
  if step == 'install':
    return [install_command(args) + ' || exit 1']
  if step == 'mount':
    return [mount_command(args) + ' || exit 1']
  return [launch_command(args)]


STEP_TITLES = {
    'create': 'Create the TPU',
    'wait': 'Wait until the queued resource is ACTIVE',
    'copy': "Copy this checkout's HEAD to every worker",
    'install': 'Install Python 3.11, the pinned requirements and the TPU jaxlib '
               'on every worker',
    'mount': 'Mount the bucket with Cloud Storage FUSE on every worker',
    'launch': 'Train: the same command on every worker',
}


def recreate_lines(args):
  """After a Spot preemption: queue the TPU again and set it up again."""
  lines = ['  if [ "$(%s)" != ACTIVE ]; then' % state_command(args),
           '    ' + delete_command(args)]
  for step in ('create', 'wait', 'copy', 'install', 'mount'):
    lines += ['    ' + line for line in step_lines(args, step)]
  lines.append('  fi')
  return lines


def resume_lines(args):
  """Rerun the training command until it ends (0) or fails for good (1)."""
  lines = [
      '# Resume: rerun the same command; 0 = done, 1 = error (not retried), '
      '143 = preempted and saved, 255 = a worker was lost',
      'attempt=1',
      'while true; do',
      '  ' + launch_command(args),
      '  status=$?',
      '  case "$status" in 0|1) exit "$status" ;; esac',
      '  if [ "$attempt" -ge %d ]; then' % args.max_attempts,
      '    echo "error: training exited with status $status after $attempt '
      'attempts" >&2',
      '    exit 1',
      '  fi',
      '  attempt=$((attempt + 1))',
      '  echo "training exited with status $status; attempt $attempt" >&2',
      '  sleep 60']
  if args.spot:
    lines += recreate_lines(args)
  lines.append('done')
  return lines


def script(args):
  """The whole bash script: what --dry_run prints and a run executes."""
  lines = ['#!/usr/bin/env bash',
           '# ' + join(['python', 'scripts/cloud_tpu.py'] + invocation(args)),
           'REPO=$(git rev-parse --show-toplevel) || exit 1']
  if args.spot and ('wait' in args.steps or args.resume):
    lines.append(wait_function(args))
  steps = [s for s in args.steps if not (args.resume and s == 'launch')]
  for step in steps:
    lines.append('# %s' % STEP_TITLES[step])
    lines += step_lines(args, step)
  if args.resume:
    lines += resume_lines(args)
  return '\n'.join(lines) + '\n'


def invocation(args):
  """The flags that produced this script, for its header line."""
  words = ['--name=' + args.name, '--zone=' + args.zone,
           '--accelerator_type=' + args.accelerator_type,
           '--runtime_version=' + args.runtime_version,
           '--bucket=' + args.bucket, '--config=' + args.config]
  words += ['--extra=' + e for e in args.extra]
  if args.workdir != '%s/runs/%s' % (MOUNT, args.name):
    words.append('--workdir=' + args.workdir)
  if args.data_dir != MOUNT + '/tfds':
    words.append('--data_dir=' + args.data_dir)
  if args.spot:
    words.append('--spot')
  if args.steps != [s for s in STEPS if args.spot or s != 'wait']:
    words.append('--steps=' + ','.join(args.steps))
  if args.resume:
    words.append('--resume')
    if args.max_attempts != 20:
      words.append('--max_attempts=%d' % args.max_attempts)
  return words


DOC_MARK = re.compile(r'(<!-- cloud_tpu\.py (.*?) -->\n```bash\n)(.*?)(```)',
                      re.S)


def update_doc(path):
  """Rewrites each ```bash block under a `<!-- cloud_tpu.py FLAGS -->`
  marker with the dry run of those flags."""
  with open(path) as f:
    text = f.read()

  def render(match):
    args = parse_flags(shlex.split(match.group(2)))
    return match.group(1) + script(args) + match.group(4)

  with open(path, 'w') as f:
    f.write(DOC_MARK.sub(render, text))


def run(text):
  """Runs the script with bash from this checkout; returns its status."""
  for tool in ('gcloud', 'git', 'bash'):
    if shutil.which(tool) is None:
      print('error: %s is not on PATH; install it (gcloud: '
            'https://cloud.google.com/sdk/docs/install) or pass --dry_run to '
            'print the commands' % tool, file=sys.stderr)
      return 1
  try:
    return subprocess.run(['bash', '-c', text], cwd=ROOT).returncode
  except KeyboardInterrupt:
    return 130


def main(argv):
  try:
    if argv[:1] == ['--update_doc']:
      update_doc(argv[1] if len(argv) > 1 else 'docs/cloud_tpu.md')
      return 0
    args = parse_flags(argv)
    text = script(args)
  except UsageError as e:
    print('error: %s' % e, file=sys.stderr)
    return 1
  if args.dry_run:
    sys.stdout.write(text)
    return 0
  return run(text)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
