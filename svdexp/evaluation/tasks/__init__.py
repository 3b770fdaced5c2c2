"""lm-eval task YAMLs of the offline ``*_embedded`` tasks (package data) and their loaders."""
