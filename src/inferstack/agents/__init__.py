"""Kubernetes-native agents: KAgent `Agent` manifests validated offline and run over the gateway."""
