"""The training loop: states and steps, many categories on a device mesh, checkpoints.

- ``train``: ``TrainState``, the optimiser, the jitted single-category steps.
- ``parallel``: the device mesh and the stacked step over category slots.
- ``checkpoints``: per-category orbax checkpoints (state + JSON item).
- ``trainer``: ``train_and_evaluate``, which runs it all for a config.
"""
