"""Production deployment: the file generator, the host and API-check commands.

``setup_production.py`` renders the templates in ``deploy/templates/`` from the
server's own settings; ``host_model.py`` runs pre-flight checks and starts the
server; ``test_api_client.py`` checks every endpoint of a running server.
"""
