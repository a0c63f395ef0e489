"""State-rank analysis: recording the recurrence, replaying it, measuring rank."""
