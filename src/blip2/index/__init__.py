"""The search index: a durable store of image rows and their BLIP-2 query embeddings, exact MaxSim scoring and an ANN stage."""
