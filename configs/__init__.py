"""ml_collections configs, pure data: importing them imports neither jax nor
TFDS. default.py + one file per task, compare.py, benchmark.py; cli.py turns
config-flag failures into one line."""
