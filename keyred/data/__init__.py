"""Data: corpus, tokenizer, packed token streams, groups, word problems and recall sets."""

IGNORE_INDEX = -100  # the target of a position that is not scored (torch's cross-entropy ignore_index)
