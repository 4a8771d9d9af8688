"""Writing datasets in the LipScale shard format (read by lipnext.data): the
shard writer, the converters and the `shapes` generator."""
