"""Running actions: the executor protocol, its implementations and its decorators."""
