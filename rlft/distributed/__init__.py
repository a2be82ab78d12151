"""Role-free distributed plumbing: starting actors (on Ray or in-process) and the Ray cluster."""
