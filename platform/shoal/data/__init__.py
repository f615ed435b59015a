"""Data: in-memory sets (memory.py), packed webdataset shards (shards.py), `shoal shard`'s writer
(writer.py: sources.py and arrow_sources.py read, columns.py picks columns, stream.py is what a source
yields, shuffle.py the external shuffle, sink.py the tar shards), where shards are (locate.py), object
storage (storage.py: s3:// through fsspec; ranged.py reads shards there by ranged requests), the even
split across ranks (partition.py) and the stream the engine sees (loaders.py).

Kept free of imports: the driver checks paths through `shoal.data.locate` without loading torch.
"""
