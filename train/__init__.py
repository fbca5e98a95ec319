"""Training of SharedLLM's cross-attention blocks (offline data generation lives in ``train.data``)."""
