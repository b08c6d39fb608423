"""The standard zero-shot and retrieval benchmarks on two-tower models (`python -m contrastive.evaluate`)."""
