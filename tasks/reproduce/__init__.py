"""The reproduction of MESA's repair experiment as cells of a DVC pipeline (reproduce/dvc.yaml)."""
