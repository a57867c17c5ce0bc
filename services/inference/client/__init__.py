"""Client-side load balancer over inference nodes (see docs/inference-client.md)."""
from services.inference.client.balancer import Balancer, PickedNode
from services.inference.client.config import BalancerSettings, load_balancer_settings

__all__ = ["Balancer", "BalancerSettings", "PickedNode", "load_balancer_settings"]
