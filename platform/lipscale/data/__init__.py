"""Writing datasets in the LipScale shard format (read by lipnext.data): the
catalog of converters and their defaults, the plan a converter hands the
writer (parts), the converters, the `shapes` generator and the shard writer."""
