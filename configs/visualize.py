"""Attention heatmaps of a trained run (--mode=visualize).

  python main.py --mode=visualize --workdir=runs/listops
  python main.py --mode=visualize --workdir=runs/listops \
      --config=configs/visualize.py --config.examples=0,5 --config.layers=1

The model, task and data come from the run's own config.json and its best
checkpoint; this config only says what to draw (evaluate/visualize.py).
Given a compare sweep's directory (--mode=compare's workdir), it draws the
first of `examples` at one layer (the first of `layers`, else the last) for
every kind of seed `seed`, side by side, above each kind's visibility.
--config may be omitted: these are the defaults.
"""
import ml_collections


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      split='test',        # 'train' | 'validation' | 'test'
      examples='0',        # comma-separated example indices in the split
      layers='',           # comma-separated layers to draw; '' -> all
      heads='',            # comma-separated query heads to draw; '' -> all
      log_scale=False,     # colour scale: log10 of the probabilities
      pool_above=128,      # tokens per axis drawn as they are; a longer
                           # sequence is drawn as means over b x b tiles,
                           # b = ceil(length / pool_above)
      label_below=64,      # token labels on the axes up to this many cells
      max_length=4096,     # longest sequence whose dense maps are computed
                           # (N^2 x heads x 4 bytes per layer)
      seed=0,              # a compare sweep's directory: the seed drawn
      out_dir='',          # '' -> RUN/maps
  ))
