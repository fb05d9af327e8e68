"""appdistill.adapters."""
