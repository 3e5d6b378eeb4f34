"""MRKD: method, FLM heads (``heads.py``) and image-level masking (``ilm.py``)."""
