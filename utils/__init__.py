"""Shared code for the pipeline stages, grouped by concern (see the README's Layout): data/, training/, weights/,
inference/, and at the top what every stage uses (cli, errors, args, artifacts, dtypes, distributed, jsonl)."""
