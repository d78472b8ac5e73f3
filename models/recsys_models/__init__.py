"""Models: two-tower retrieval, multi-task ranker, training, evaluation, ANN index."""
