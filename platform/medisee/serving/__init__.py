"""Online serving: one Ray Serve graph (ingress -> MLLM -> verifier -> decoder) on the Predictor's stages."""
