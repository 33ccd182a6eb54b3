"""The write path (app/write): ingest, append races, changes/ (upsert, delete, restore, expire)."""
