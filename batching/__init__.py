"""Dynamic batching: the dispatch policy, tensor concat/split, and the batcher."""
