"""The data without TensorFlow: folders, demo data, decoded arrays, the Pillow source.

``folder`` (scanning and validation, ``DatasetError``), ``demo_data`` (the
offline demo tree), ``decode`` (Pillow + numpy decoding, bit for bit as the
tf.data pipeline), ``category_data`` (``CategoryData``: a category's decoded
splits and its batches) and ``source`` (the ``DataSource`` API and
``PillowSource``). Nothing here imports TensorFlow or tensorflow_datasets: the
tf.data pipeline and the tfds builders are the top-level package
``data_pipelines``.
"""
