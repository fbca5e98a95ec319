"""The system prompt SharedLLM's cross-attention is trained with.

Training items (train/data) and the app's `sharedllm` engine must use the same words: the
cross-attention learns to read the memory in the context of this conversation frame.
"""

SHAREDLLM_SYSTEM_PROMPT = ("You are a helpful assistant. Answer the user's questions about the attached "
                           "document using only its content.")
