"""Evaluation on the host: predictions, metrics, thresholds, pictures and results tables.

Everything here takes numpy arrays (maps, scores, masks, labels); nothing runs
inside jitted code.
"""
