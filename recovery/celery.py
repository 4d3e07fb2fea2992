"""`celery -A recovery …` finds the app here, as Celery users expect (Celery
looks for a `celery` module in the package named by -A): inspect, control,
events and Flower work against a running deployment."""

from recovery.tasks import app

__all__ = ["app"]
