"""Data: reading records in the seed projects' formats, prompt and conversation templates, encoding to labelled token ids."""
