"""The floor beneath the stages for language models: loading one, capturing its residual stream, batching
token sequences for it. Extract, evaluate and steering all build on this; none imports another's runner."""
