"""Recipe -> trained bundle: the generic run, the curriculum of stages, the quickstart."""
