"""The engine that trains any task, with its checkpoints."""
