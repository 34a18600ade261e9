"""Where adapters meet engines: one wrapper per engine around the frozen base linear."""
