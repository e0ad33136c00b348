"""The Gateway API Inference Extension endpoint picker: Envoy ext_proc over the gateway pipeline."""
