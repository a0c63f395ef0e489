"""State-rank analysis of the recurrent delta-rule states of trained models.

`sources` says which checkpoint and which tokens, `recording` captures what the real fla layers
feed their delta-rule ops, `measures` replays the recurrence and measures the states' ranks,
`ranks` puts the three together into one tidy table per checkpoint (keyred.stages.analyse is the
command line).
"""
