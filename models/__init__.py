"""Flax NNX modules with no task knowledge: the Transformer encoder and
the Model that pairs it with a head."""
