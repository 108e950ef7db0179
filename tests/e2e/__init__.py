"""End-to-end tests: whole runs on Ray, weight sync between real processes, job submission."""
