"""Client-side load balancer over inference nodes (see docs/balancer.md)."""
from services.common.balancer.balancer import Balancer, PickedNode
from services.common.balancer.config import BalancerSettings, load_balancer_settings

__all__ = ["Balancer", "BalancerSettings", "PickedNode", "load_balancer_settings"]
