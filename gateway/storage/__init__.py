"""Persistent state: SQLAlchemy 2 async over SQLite (aiosqlite) or PostgreSQL (asyncpg)."""

from gateway.storage.db import Database, upgrade_database

__all__ = ["Database", "upgrade_database"]
