"""The event log (events/): the codec, the Redis log, the archive, the storage backends."""
