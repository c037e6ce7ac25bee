"""Training: the one run loop every stage plugs into, the sharded train step, the orbax
train-state checkpoints and the metrics logs."""
