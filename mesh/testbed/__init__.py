"""Run a whole topology on one machine with emulated links."""
