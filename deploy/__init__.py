"""Deployment past one machine: Envoy config generator and Kubernetes manifests."""
