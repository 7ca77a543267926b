"""idforge.eval: identity similarity (FS, ``identity``), held-out identity groups read from shards
(``groups``), and the benchmark tables (``benchmark``)."""
