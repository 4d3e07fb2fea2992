"""recovery: win back failed Stripe subscription payments."""

__version__ = "0.1.0"
