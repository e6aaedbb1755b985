"""The captioner HTTP service: a Flask app (``service.app:create_app``) served by gunicorn in production.

Importing this package is cheap (no torch, no prometheus): gunicorn's master process imports
:mod:`service.logs` from its config file before forking workers.
"""
