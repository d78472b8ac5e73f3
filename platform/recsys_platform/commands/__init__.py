"""CLI command groups, one module per area; ``recsys_platform.cli`` registers them."""
