"""RD with Expert (URD): method, fusion student (``student.py``), DRAEM anomalies (``draem.py``)."""
