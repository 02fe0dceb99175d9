"""What every method shares: placement and injection, feature layouts, adapter state."""
