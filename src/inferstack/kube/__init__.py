"""Kubernetes: pod discovery for pools (`pools.X.kubernetes`) and the Helm chart's values."""
