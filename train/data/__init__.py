"""Input pipelines: embedded offline datasets, tokenizers and TFDS adapters."""
