"""Running ``precision capture`` end to end: the runner, its dry-run plan and step-by-step
replay of an engine's tokens."""
