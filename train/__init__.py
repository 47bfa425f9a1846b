"""One run: the step builder (step.py), the loop (trainer.py), data,
checkpoints, records and step profiling."""
