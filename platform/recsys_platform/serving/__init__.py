"""Real-time serving: retrieval -> ranking in one Ray Serve replica, hot-swapped bundles."""
