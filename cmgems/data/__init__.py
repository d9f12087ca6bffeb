"""The dataset: k-mer tokens, the NPMI table, HDF5 shards (the on-disk format), the loader and packing."""
