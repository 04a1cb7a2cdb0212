"""The functional training core: ``TrainState``, optimizers, per-algorithm steps, checkpoints."""
