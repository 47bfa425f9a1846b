"""Small pure-Python helpers every layer may use (no jax, no TFDS; nothing
of the project's imported here): dotted paths into nested configs and
records (paths), progress lines with an ETA (progress), host malloc
settings (host_memory)."""
