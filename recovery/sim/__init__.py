"""A Stripe-compatible server (see server.py)."""

from recovery.sim.server import CardBehavior, StripeSim

__all__ = ["CardBehavior", "StripeSim"]
