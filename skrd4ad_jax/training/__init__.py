"""The training loop: every job of a config on the device slots, with checkpoints and results.

- ``train``: ``train_and_evaluate``, the loop read top to bottom.
- ``preflight``: the config validated and resolved once, before anything runs.
- ``jobs``: the (category, seed) jobs, where each stands, what its checkpoint stores.
- ``schedule``: step budgets per job, the slot plan's segments, slot counts.
- ``slots``: the memory-aware slot plan (mesh, slots, which job runs where and when).
- ``slot_states``: the stacked slot states; jobs entering (restored) and leaving (saved).
- ``memory``: the step's device memory estimate, slots that fit, out-of-memory advice.
- ``parallel``: the device mesh and the stacked step over the slots; collectives.
- ``steps``: the jitted single-job training and evaluation steps.
- ``inputs``: the data decoded and checked once, each job's batch maker.
- ``batches``: batches as a function of (seed, step); the prefetcher.
- ``evaluator``: a slot's state to predictions, metrics, files and a results row.
- ``host``: host work off the loop (background thread), stop requests, ``Preempted``.
- ``writers``: TensorBoard runs per job (or the log), the results tables.
- ``checkpoints``: per-job orbax checkpoints (state + JSON item), damaged ones set aside.
- ``workdir_lock``: one run per workdir; the workdir created and proved writable.
- ``faults``: named fault points for the tests that kill or starve a run.
"""
