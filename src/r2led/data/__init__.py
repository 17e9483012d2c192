"""Data: sources -> canonical tables -> LifelongStore -> samples and batches."""
