"""Each attack's Settings and BUDGETS, importable without torch (the CLI builds its flags from them)."""
