"""Training loops and what they share."""
