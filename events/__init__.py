"""Events: stored structs, codec, the EventLog port and its Redis Streams adapter."""
