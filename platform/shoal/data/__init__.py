"""Data: in-memory sets (memory.py), packed webdataset shards (shards.py, writer.py), where shards are
(locate.py), the even split across ranks (partition.py) and the stream the engine sees (loaders.py).

Kept free of imports: the driver checks paths through `shoal.data.locate` without loading torch.
"""
