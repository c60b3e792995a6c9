"""keen_stream's data layer: asyncpg over PostgreSQL with row-level security.

Never imports the hub or the web stack (checked by import-linter).
"""

from keen_stream.dal.database import KeenDatabase

__all__ = ["KeenDatabase"]
