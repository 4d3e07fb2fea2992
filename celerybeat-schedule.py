"""The beat schedule: what runs periodically, and how often.

Read by recovery.tasks (by path: the hyphenated name cannot be imported).
`expires` drops a tick that waited longer than its period in a busy queue, so
ticks never pile up; every task here is safe to run twice.
"""

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
}
