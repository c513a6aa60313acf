"""Deployment on Flower's Deployment Engine: TLS certificates and SuperNode keys (`deploy.certs`), running
the federation on a SuperLink and checking the run's final status (`deploy.flwr_run`), and a loopback
SuperLink with SuperNodes for tests and development (`deploy.local`). See docs/DEPLOYMENT.md.

Importing `deploy` imports nothing heavy; the submodules are imported where they are used.
"""
