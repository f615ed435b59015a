"""Running a job on Ray: a controller with explicit states and one restart loop (controller.py), a pure
failure policy (failure.py), and the groups it runs (worker_group.py; the parameter servers' in ps/)."""
