"""Training of SharedLLM's cross-attention blocks (offline data generation lives in ``model.train.data``)."""
