"""Whole-process tests: real serve/worker processes, redis restarts and topologies, durability."""
