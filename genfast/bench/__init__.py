"""genfast benchmark command."""
