"""State tracking on group word problems: the model, its training and its scores."""
