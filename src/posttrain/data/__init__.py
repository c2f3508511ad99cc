"""Data path: files → rows (readers) → records (formats) → token ids + labels (templates) → batches."""
