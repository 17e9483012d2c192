"""Models: shared building blocks (layers, simhash, retrieval) and one file per model."""
