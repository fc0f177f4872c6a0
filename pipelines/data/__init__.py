"""The data library the stages use: sources, normalization, quality rules, near-duplicate detection,
decontamination, incremental dedup, the DuckDB catalog, the data report, sdist downloads. It imports no
stage and no application.
"""
