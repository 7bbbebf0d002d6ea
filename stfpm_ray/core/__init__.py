"""The method in plain PyTorch, runnable without Ray: teacher, students, loss, anomaly map, fit recipe, scoring
step and checkpoint format."""
