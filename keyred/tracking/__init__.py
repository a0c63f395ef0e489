"""State tracking on group word problems: which Gated DeltaProducts learn to track the state of
a group, and up to which length. spec (the settings of one run, light), model, scoring,
training (the loop, with resume), run (train, test, write)."""
