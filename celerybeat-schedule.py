"""The beat schedule: what runs periodically, and how often.

Read by recovery.tasks (by path: the hyphenated name cannot be imported).
`expires` drops a tick that waited longer than its period in a busy queue, so
ticks never pile up; every task here is safe to run twice.
"""

from celery.schedules import crontab

SCHEDULE = {
    # Hand stored webhook events to workers, in batches; also the sweep that
    # re-sends what a down broker or a dead worker left pending.
    "relay-inbox": {
        "task": "recovery.relay_inbox",
        "schedule": 1.0,
        "options": {"expires": 5},
    },
    # Claim the retries, emails and final actions that are due and hand them
    # to workers. Event processing also dispatches at once what it made due.
    "dispatch-steps": {
        "task": "recovery.dispatch_steps",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # Send queued emails that are due: retries after a transient SMTP error,
    # pre-dunning emails, and anything a worker's own dispatch missed (a
    # thank-you is sent as its case closes). Plan emails are sent by their step.
    "dispatch-outbox": {
        "task": "recovery.dispatch_outbox",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # Send the SMS that are due (their quiet hours over), and settle any a
    # dead worker left in doubt by asking the provider.
    "send-texts": {
        "task": "recovery.send_texts",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # Deliver what the business's endpoints are owed that is due: a retry
    # 5 s after a failure, and what a worker's own dispatch missed. On the
    # webhooks queue, with its own workers.
    "dispatch-deliveries": {
        "task": "recovery.dispatch_deliveries",
        "schedule": 2.0,
        "options": {"expires": 10},
    },
    # Conditions operators are alerted to (business/alerts.py).
    "check-alerts": {
        "task": "recovery.check_alerts",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    # The daily digest: recovered amounts, open cases, what needs a person.
    "alert-digest": {
        "task": "recovery.alert_digest",
        "schedule": crontab(minute=0, hour=8),
        "options": {"expires": 3600},
    },
}
