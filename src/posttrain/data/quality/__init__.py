"""Training-data quality: `posttrain quality` (run.py) and the checks it is made of.

    text.py           normalisation and words, shared by every check
    filters.py        heuristic rules (length, echo, encoding, Gopher repetition, blocklist)
    pii.py            personal information: detection with checksums, redaction
    dedup.py          exact and MinHash-LSH near-duplicates, re-checked by exact Jaccard
    contamination.py  evaluation prompts inside training rows (n-gram overlap)
    perplexity.py     perplexity of each trained response under a reference model, and the cuts on it
    stats.py          lengths, diversity, category entropy, the per-category cap
    tokens.py         template and label-mask checks with the training tokenizer
    rows.py           reading rows of any training format, and their prompt/response/full texts
    report.py         report.md
"""
