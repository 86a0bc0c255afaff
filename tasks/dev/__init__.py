"""Developer commands: the code-deps walk that writes every stage's deps, and the shard runner."""
