"""`spoctl prepare` and the prepared-data format.

- sources: read local files (JSONL/JSON/Parquet/CSV, gzip) and Hub datasets, locating every record
- formats: detect the format and turn records into (prompt messages, chosen, rejected) pairs per dimension
- clean:   pair ids, ties/duplicates, the seeded cap and train/eval split, length statistics
- render:  chat template, tokenization and the length policy
- prepare: the pipeline behind `spoctl prepare`
- store:   the on-disk schema and `load_prepared`, the reader `align`/`eval` use
"""
