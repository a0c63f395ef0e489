"""Multi-query associative recall: models trained on MQAR, their key reduction, the capacity curve."""
