"""keen_stream: keen's multi-tenant data layer and real-time streaming hub."""

from keen_stream import errors
from keen_stream.dal.database import KeenDatabase
from keen_stream.settings import Settings, get_settings

__all__ = ["KeenDatabase", "Settings", "errors", "get_settings"]
__version__ = "0.1.0"
