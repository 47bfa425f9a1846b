"""The top layer: benchmark, compare sweeps, tables and plots. It calls
train/, never the other way round."""
