"""A Stripe-compatible server (see server.py)."""

from recovery.stripe_sim.server import CardBehavior, StripeSim

__all__ = ["CardBehavior", "StripeSim"]
