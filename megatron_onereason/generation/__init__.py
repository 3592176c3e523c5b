"""Generation: constrained itemic decoding, two-stage think-then-items rollouts, transformers and vLLM backends."""
