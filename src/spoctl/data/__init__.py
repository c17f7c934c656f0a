"""`spoctl prepare` and the prepared-data format.

- sources:  what a `--data DIM=SOURCE` names (file, dataset folder, Hub id with options) and reading it
- readers:  local files (JSONL/JSON/Parquet/CSV, gzip), read once and hashed while read, with size guards
- hubdata:  dataset folders and Hub datasets through `datasets.load_dataset` (streaming included)
- records:  `Where` a record came from, and the per-record checks (field size, Unicode, nesting)
- formats:  the format registry, detection, and the adapters turning records into pairs per dimension
- reading:  step 1 of prepare: every source to pairs (columns, detection, taking some dimensions)
- clean:    pair ids, ties/duplicates, the seeded cap and train/eval split, length statistics
- render:   chat template, tokenization and the token-level length policy
- truncate: cutting over-long prompts at message boundaries
- build:    step 2 of prepare: one dimension to tokenized, fitted, split rows
- outdir:   checking and claiming --out, writing the new folder atomically, cleaning stale temporary folders
- prepare:  the pipeline behind `spoctl prepare`
- store:    the on-disk schema and `load_prepared`, the verified, locked reader `align`/`eval` use
"""
