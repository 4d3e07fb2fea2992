"""Telling the business: signed webhooks to its systems, alerts to its operators.

announce.py    a case's change → an event row and a delivery row per
               endpoint, in the change's own transaction
endpoints.py   the endpoints an operator adds, rotates, disables
deliveries.py  claim due deliveries, sign, POST, retry on Svix's schedule
egress.py      HTTP to an endpoint: never to a private or metadata address
alerts.py      conditions operators hear about through apprise
"""
