"""Data: text corpora, fine-tuning examples, MDS datasets, packing and mixtures."""
