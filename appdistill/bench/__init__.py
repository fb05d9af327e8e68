"""``appdistill bench``: compare distillation methods on any config (runner, variants, report)."""
