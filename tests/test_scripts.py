"""scripts/cloud_tpu.py: its dry run prints the documented gcloud commands,
docs/cloud_tpu.md shows exactly that output, and mistakes end in one
`error:` line. Subprocesses only; no JAX, no network, well under 10 s."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'cloud_tpu.py')
DOC = os.path.join(ROOT, 'docs', 'cloud_tpu.md')
BASE = ['--name=attn-v5e', '--zone=us-west4-a',
        '--accelerator_type=v5litepod-16',
        '--runtime_version=v2-alpha-tpuv5-lite', '--bucket=my-bucket',
        '--config=configs/listops.py:lra']


def launcher(*flags, path=None):
  """Runs the launcher; returns (status, stdout, stderr)."""
  env = dict(os.environ)
  if path is not None:
    env['PATH'] = path
  done = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=30)
  return done.returncode, done.stdout, done.stderr


def dry_run(*flags):
  status, out, err = launcher(*BASE, *flags, '--dry_run')
  assert status == 0, err
  return out


def gcloud_lines(text):
  return [line.strip() for line in text.splitlines()
          if 'gcloud ' in line and not line.lstrip().startswith('#')]


def test_spot_creates_a_queued_resource_and_waits():
  out = dry_run('--spot')
  create = [l for l in gcloud_lines(out) if ' create ' in l]
  assert create[0].startswith(
      'gcloud compute tpus queued-resources create attn-v5e ')
  for flag in ('--node-id=attn-v5e', '--zone=us-west4-a',
               '--accelerator-type=v5litepod-16',
               '--runtime-version=v2-alpha-tpuv5-lite', '--spot'):
    assert flag in create[0].split()
  assert 'wait_active || exit 1' in out
  assert "--format='value(state.state)'" in out


def test_on_demand_creates_a_tpu_vm_without_waiting():
  out = dry_run()
  create = [l for l in gcloud_lines(out) if ' create ' in l]
  assert create == [
      'gcloud compute tpus tpu-vm create attn-v5e --zone=us-west4-a '
      '--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite '
      '|| exit 1']
  assert 'queued-resources' not in out and 'wait_active' not in out


def test_install_mount_and_launch_run_on_every_worker():
  out = dry_run('--spot', '--extra=--config.mesh.data=-1')
  ssh = [l for l in gcloud_lines(out) if ' tpu-vm ssh ' in l]
  assert len(ssh) == 3  # install, mount, launch
  for line in ssh:
    assert '--worker=all' in line.split()
  install, mount, launch = ssh
  assert 'pip install -r requirements.txt' in install
  assert '"jax[tpu]==0.10.2"' in install  # the version requirements.txt pins
  assert 'gcsfuse --implicit-dirs' in mount and 'my-bucket /mnt/gcs' in mount
  remote = shlex.split(launch)[-1]
  assert remote.startswith('--command=cd efficient-attention && ')
  assert ('.venv/bin/python main.py --config=configs/listops.py:lra '
          '--workdir=/mnt/gcs/runs/attn-v5e --config.data_dir=/mnt/gcs/tfds '
          '--distributed --config.mesh.data=-1') in remote
  scp = [l for l in gcloud_lines(out) if ' tpu-vm scp ' in l]
  assert len(scp) == 1 and '--worker=all' in scp[0].split()


def test_resume_reruns_the_same_command():
  plain = dry_run('--spot')
  out = dry_run('--spot', '--resume')
  launch = [l for l in gcloud_lines(plain) if 'main.py' in l][0]
  loop = out[out.index('while true; do'):]
  assert [l for l in gcloud_lines(loop) if 'main.py' in l] == [launch]
  assert 'case "$status" in 0|1) exit "$status" ;; esac' in loop
  # A preempted Spot TPU is deleted, queued again and set up again.
  assert 'queued-resources delete attn-v5e --zone=us-west4-a --force' in loop
  assert 'queued-resources create attn-v5e' in loop
  assert 'pip install -r requirements.txt' in loop
  assert 'gcsfuse --implicit-dirs' in loop


def test_dry_run_is_valid_bash():
  for flags in ((), ('--spot',), ('--spot', '--resume'), ('--resume',)):
    done = subprocess.run(['bash', '-n'], input=dry_run(*flags), text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stderr


def test_doc_examples_are_the_dry_run_output():
  with open(DOC) as f:
    text = f.read()
  blocks = re.findall(r'<!-- cloud_tpu\.py (.*?) -->\n```bash\n(.*?)```',
                      text, re.S)
  assert len(blocks) >= 3
  for flags, body in blocks:
    status, out, err = launcher(*shlex.split(flags), '--dry_run')
    assert status == 0, err
    assert body == out, 'rerun: python scripts/cloud_tpu.py --update_doc'


def test_a_run_executes_the_printed_commands(tmp_path):
  """With a stand-in gcloud on PATH, a run calls gcloud with exactly the
  arguments of the dry run's gcloud lines."""
  log = tmp_path / 'calls'
  fake = tmp_path / 'gcloud'
  fake.write_text('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\n'
                  'case "$*" in *describe*) echo ACTIVE ;; esac\n' % log)
  fake.chmod(0o755)
  flags = BASE + ['--spot', '--steps=create,wait,launch']
  status, _, err = launcher(*flags, path='%s:/usr/bin:/bin' % tmp_path)
  assert status == 0, err
  printed = [' '.join(shlex.split(l.replace(' || exit 1', ''))[1:])
             for l in gcloud_lines(dry_run('--spot', '--steps=create,wait,launch'))
             if l.startswith('gcloud ')]
  calls = log.read_text().splitlines()
  assert calls[0] == printed[0]  # create
  assert 'queued-resources describe attn-v5e' in calls[1]  # wait
  assert calls[-1] == printed[-1]  # launch


def test_without_gcloud_one_error_line(tmp_path):
  status, out, err = launcher(*BASE, path=str(tmp_path))
  assert status == 1 and out == ''
  assert err.count('\n') == 1 and err.startswith('error: gcloud is not on PATH')


@pytest.mark.parametrize('flags, message', [
    (BASE + ['--bogus'], 'unrecognized arguments: --bogus'),
    (BASE[1:], 'required: --name'),
    (BASE + ['--bucket=gs://my-bucket'], '--bucket=gs://my-bucket'),
    (BASE + ['--workdir=gs://my-bucket/runs/x'], 'gs:// paths are not'),
    (BASE + ['--steps=create,train'], 'unknown step train'),
    (BASE + ['--max_attempts=zero'], '--max_attempts'),
])
def test_bad_flag_one_error_line(flags, message):
  status, out, err = launcher(*flags, '--dry_run')
  assert status == 1 and out == ''
  assert err.count('\n') == 1 and err.startswith('error: '), err
  assert message in err
