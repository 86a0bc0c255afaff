"""MESA: Max-Entropy Staircase Approximator (Qiao, Yang, Li, NeurIPS 2019) and its backdoor lab."""
