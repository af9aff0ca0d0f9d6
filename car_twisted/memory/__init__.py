"""The memory graph ("memgine"): facts, retrieval by personalized PageRank, scopes and persistence."""
