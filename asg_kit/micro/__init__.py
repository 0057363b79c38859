"""The shapes world and the micro model: the whole method, runnable and judgeable on a CPU."""
