"""The scan service's tasks: discover arriving models, claim each once, check, scan, record."""
