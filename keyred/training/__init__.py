"""Training loops and what they share: optimizer (AdamW with one weight-decay rule, the warm-up +
cosine schedule, the checked and clipped step), meter (tokens/s, elapsed, ETA), batches (windows
of the packed corpus), distributed (torchrun), resume (the resume state); lm (language-model
training) and lora (LoRA recovery) use them, and so does keyred.tracking.training."""
