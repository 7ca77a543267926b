"""idforge.eval: identity similarity (FS) and the benchmark tables."""
