"""Data: corpus, tokenizer, packed token streams, groups and word problems."""
