"""Byte-level document classification (LRA's Text task).

  python main.py --config=configs/text.py:cpu --workdir=runs/text
Tokens are UTF-8 bytes after a CLS token (vocabulary 258); documents are
truncated to max_length - 1 bytes and right-padded (tasks/text.py).
Presets: smoke (seconds, tests), cpu (WordNet offline: the 9 verb
lexicographer files with at least 690 synsets, 1K-byte documents, under 20
minutes on 2 cores), lra (LRA's IMDb setting: 4K
bytes, its model and schedule; downloads imdb_reviews through TFDS on first
use; accelerators).
"""
from configs import default


def smoke(c):
  """The smoke preset (configs/retrieval.py's too)."""
  c.task.update(max_length=128, doc_bytes=127, num_train=256,
                num_validation=64, num_test=64)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)


# The cpu preset's classes: the verb files with at least 690 synsets
# (WordNet 3.0: change 2,383, cognition 695, communication 1,548, contact
# 2,196, creation 694, motion 1,408, possession 847, social 1,106, stative
# 756). Their bytes say less about their class than the noun files' do
# (bag of bytes 57% here, 87% on the 13 largest noun files) while their
# trigrams say as much (96%, 99.7%): docs/quality.md.
CPU_CLASSES = ('verb.change,verb.cognition,verb.communication,verb.contact,'
               'verb.creation,verb.motion,verb.possession,verb.social,'
               'verb.stative')


def _cpu(c):
  # 1,024 tokens; about 2.1 steps/s with full attention on 2 cores at batch
  # 16, so 1,900 steps plus evaluation fit in 20 minutes (docs/quality.md).
  c.task.update(classes=CPU_CLASSES, max_length=1024, doc_bytes=1023,
                num_train=20_000, num_validation=1_300, num_test=2_600)
  c.model.update(num_layers=1, dim=64, num_heads=2, mlp_dim=128)
  c.train.update(batch_size=16, num_steps=1900, learning_rate=2e-3,
                 warmup_steps=100, eval_every=475, log_every=50,
                 checkpoint_every=475)


def _lra(c):
  # LRA's text config: batch 32, 20K steps, 8K warmup, 4 layers, 4 heads,
  # width 256, MLP 1024, reviews of 4K bytes (the paper; its repository's
  # config kept 1K: --config.task.max_length=1001). Peak learning rate
  # 5e-4 with this trainer's warmup + cosine (LRA: 0.05 with rsqrt decay).
  c.task.update(dataset='imdb_reviews', max_length=4001)
  c.model.update(num_layers=4, dim=256, num_heads=4, mlp_dim=1024,
                 dropout=0.1)
  c.train.update(batch_size=32, num_steps=20_000, learning_rate=5e-4,
                 warmup_steps=8000, eval_every=1000, log_every=100,
                 checkpoint_every=1000)


def get_config(arg=None):
  c = default.base()
  c.model.pooling = 'mean'
  c.task.update(
      name='text',
      dataset='wordnet',        # 'wordnet' (offline) | 'imdb_reviews' (TFDS)
      max_length=1024,          # tokens per input: CLS + up to this - 1 bytes
  )
  wordnet_fields(c)
  c.task.update(
      num_validation=1_300,
      num_test=2_600,
      # imdb_reviews
      validation_percent=10,    # this share of train, at random, validates
      download=True,            # download imdb_reviews into data_dir if missing
      data_seed=0,              # synset splits and documents; IMDb's cut
  )
  return default.with_preset(
      c, arg, {'smoke': smoke, 'cpu': _cpu, 'lra': _lra}, default='cpu')


def wordnet_fields(c):
  """The offline WordNet corpus's fields (tasks/wordnet.py), shared with
  configs/retrieval.py."""
  c.task.update(
      source_dir='',            # WordNet data.* files; '' -> Debian's
                                # /usr/share/wordnet (wordnet-base)
      classes='',               # lexicographer files, comma-separated;
                                # '' -> the 13 largest noun files
      doc_bytes=1023,           # a document: synsets until >= this many bytes
      num_train=20_000,         # examples per split: documents (text,
      num_validation=1_000,     # balanced over classes) or pairs
      num_test=2_000,           # (retrieval, half from one file)
  )
