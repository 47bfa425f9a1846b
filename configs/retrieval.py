"""Two-document byte-level retrieval (LRA's Retrieval task), `match` head.

  python main.py --config=configs/retrieval.py:cpu --workdir=runs/retrieval
Each document: CLS then up to max_length - 1 UTF-8 bytes (vocabulary 258),
right-padded; one shared encoder, [a, b, a*b, a-b] into an MLP
(tasks/retrieval.py, tasks/heads/match.py).
Presets: smoke (seconds, tests), cpu (WordNet pairs offline: same
lexicographer file or not, 1K bytes per document, minutes on 2 cores), lra
(LRA's AAN citation pairs from its released TSVs, 4K bytes per document, its
model and schedule; accelerators).
"""
from configs import default, text


def _cpu(c):
  # Two 1,024-token documents per example: batch 8 is 16 sequences, about
  # 1.4 steps/s with full attention on 2 cores, so 1,300 steps plus
  # evaluation fit in 20 minutes (docs/quality.md).
  c.task.update(max_length=1024, doc_bytes=1023, num_train=20_000,
                num_validation=1_000, num_test=2_000)
  c.model.update(num_layers=1, dim=64, num_heads=2, mlp_dim=128)
  c.train.update(batch_size=8, num_steps=1300, learning_rate=2e-3,
                 warmup_steps=100, eval_every=325, log_every=50,
                 checkpoint_every=325)


def _lra(c):
  # LRA's matching config: batch 32, 5K steps, 4 layers, 4 heads, width
  # 128, MLP 512, CLS pooling, 4,000 bytes per document (its lr 0.05 with
  # rsqrt decay and 8K warmup has no equivalent in this trainer's warmup +
  # cosine: peak 5e-4, 500 warmup steps here).
  # manual_dir: where lra_release.gz's tsv_data lands when it is extracted
  # in the working directory.
  c.task.update(dataset='lra_release', max_length=4001,
                manual_dir='lra_release/lra_release/tsv_data')
  c.model.update(num_layers=4, dim=128, num_heads=4, mlp_dim=512,
                 dropout=0.1, pooling='cls')
  c.train.update(batch_size=32, num_steps=5000, learning_rate=5e-4,
                 warmup_steps=500, weight_decay=0.1, eval_every=500,
                 log_every=100, checkpoint_every=500)


def get_config(arg=None):
  c = default.base()
  c.model.pooling = 'mean'
  c.task.update(
      name='retrieval',
      dataset='wordnet',        # 'wordnet' (offline) | 'lra_release' (AAN TSVs)
      max_length=1024,          # tokens per document: CLS + up to this - 1
                                # bytes
      data_seed=0,              # wordnet: synset splits and pairs
      # lra_release
      manual_dir='',            # folder of new_aan_pairs.{train,eval,test}.tsv
  )
  text.wordnet_fields(c)        # wordnet: the documents and their classes
  return default.with_preset(
      c, arg, {'smoke': text.smoke, 'cpu': _cpu, 'lra': _lra}, default='cpu')
