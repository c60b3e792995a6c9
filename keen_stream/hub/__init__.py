"""The real-time side: database changes to WebSocket clients (docs/architecture.md).

``create_app()`` builds the ASGI application; ``keen-stream serve`` runs it under uvicorn.
"""

from keen_stream.hub.app import HubApp, create_app
from keen_stream.hub.service import HubService

__all__ = ["HubApp", "HubService", "create_app"]
